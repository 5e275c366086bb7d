"""The embedded toy world: synthetic knowledge, a tokenizer, and tiny pretrained models.

Build (or reuse) a world and read it:

    >>> from unlearn.toyworld import build_world, get_preset
    >>> world = build_world(get_preset("tiny"), preset="tiny")
    >>> world.report()["unfiltered"]["retain_acc"]
    >>> items = world.items("forget_heldout")          # 4-way cloze items, reserved template
    >>> model_dir = world.model_dir("unfiltered")      # load with unlearn.models.load_model

`python -m recipes.toyworld` does the same from the command line. See `unlearn.toyworld.world` for
the directory layout and `unlearn.toyworld.generator` for what the corpora contain.
"""

from unlearn.toyworld.build import build_world, evaluate_checkpoint
from unlearn.toyworld.config import PRESETS, ToyWorldConfig, get_preset
from unlearn.toyworld.generator import ITEM_SPLITS, generate_world
from unlearn.toyworld.world import MODEL_NAMES, ToyWorld, unlearn_home, world_dir

__all__ = [
    "ITEM_SPLITS",
    "MODEL_NAMES",
    "PRESETS",
    "ToyWorld",
    "ToyWorldConfig",
    "build_world",
    "evaluate_checkpoint",
    "generate_world",
    "get_preset",
    "unlearn_home",
    "world_dir",
]
