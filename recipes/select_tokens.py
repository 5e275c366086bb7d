"""Select the forget tokens to unlearn with one selector, and measure the mask against the truth.

`python -m recipes.select_tokens --selector <name>` loads the model and data (the toy world's by
default: its attack-split forget documents, retain documents, forget dev items and keyword file),
runs the selector (`unlearn.selection.SELECTORS`: keywords, activations, probe, sae, attribution)
on the forget documents, tokenized exactly as training rows, and writes to --out:

    mask.safetensors   one bool per token of every forget row (pass it, or --out, to
                       `--token_mask` of any unlearning recipe)
    summary.json       fraction selected, precision, recall and F1 against the ground-truth value
                       tokens (the documents' "facts" spans), the settings and what the selector
                       chose
    masks.png          a few documents with the selected tokens shaded and the values underlined
    run_key.json, run_info.json

The mask is also cached under $UNLEARN_HOME/token_masks, keyed by the selector, its settings, the
content of the model, documents, dev items and keywords, and the code version, so a rerun (or a
training run with `--token_mask <name>` and the same inputs) reuses it. `--selector <name> --help`
lists that selector's settings.

Commands:
    python -m recipes.select_tokens --selector keywords
    python -m recipes.select_tokens --selector probe --layer 2 --fraction 0.1 --out runs/probe_mask
    python -m recipes.select_tokens --selector sae --world_preset tiny --num_steps 50 \
        --out /tmp/sae_mask                                      # tiny CPU smoke run
    python -m recipes.unlearn --method sequential --token_mask runs/probe_mask
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, field, make_dataclass
from pathlib import Path
from typing import Any

import simple_parsing

from unlearn.config import ALL_TOKENS
from unlearn.experiment import (
    TOYWORLD,
    DataConfig,
    ModelConfig,
    load_setup,
    model_identity,
    selection_inputs,
    start_run,
)
from unlearn.plots import plot_token_masks
from unlearn.provenance import write_run_info
from unlearn.runs import run_recipe
from unlearn.selection import (
    MASK_FILE,
    NEEDS_KEYWORDS,
    SELECTORS,
    SelectionInputs,
    TokenMask,
    cached_selection,
    mask_quality,
    read_keywords,
    save_token_mask,
    selector,
)

SHOWN_DOCUMENTS = 4
"""Documents drawn in masks.png."""


@functools.cache
def config_class(name: str) -> type:
    """The recipe config of selector `name`: out, overwrite, model, data, keywords, its settings.

    Raises:
        ValueError: An unknown selector.
    """
    chosen = selector(name)
    fields = [
        (
            "out",
            str,
            simple_parsing.field(
                default=f"runs/select_tokens/{name}",
                help="Output directory (rerun the same command to redo the run there).",
            ),
        ),
        (
            "overwrite",
            bool,
            simple_parsing.field(
                default=False, help="Delete what --out holds (a run folder) and start over."
            ),
        ),
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        ("data", DataConfig, field(default_factory=DataConfig)),
        (
            "keywords",
            str | None,
            simple_parsing.field(
                default=None,
                help="Keyword file, one keyword a line (default: the toy world's: its forget "
                "domain's entity names and values).",
            ),
        ),
        ("settings", chosen.settings, field(default_factory=chosen.settings)),
    ]
    camel = "".join(part.title() for part in name.split("_"))
    cls = make_dataclass(f"{camel}SelectionConfig", fields, namespace={"selector_name": name})
    cls.__doc__ = f"Token selection with the {name} selector: {chosen.summary}."
    cls.__module__ = __name__
    return cls


def check_config(cfg: Any) -> list[str] | None:
    """Check what the settings allow before anything loads; the keywords, if a file names them.

    Raises:
        ValueError: `--token_mask` given (it configures training, not selection), or a
            keyword-based selector without keywords outside the toy world, or an empty keyword
            file.
    """
    if cfg.data.token_mask != ALL_TOKENS:
        raise ValueError(
            "--token_mask chooses the mask a training run uses; select_tokens makes one: drop it"
        )
    is_toy = cfg.model.model.split(":")[0] == TOYWORLD
    if cfg.selector_name in NEEDS_KEYWORDS and cfg.keywords is None and not is_toy:
        raise ValueError(f"the {cfg.selector_name} selector needs --keywords <file> here")
    return read_keywords(cfg.keywords) if cfg.keywords is not None else None


def summarize(mask: TokenMask, inputs: SelectionInputs, cached: bool) -> dict[str, Any]:
    """summary.json: the mask's quality against the value tokens, and what made it."""
    forget = inputs.forget
    quality = mask_quality(mask.rows, forget.value_masks)
    truth = mask_quality(forget.value_masks, forget.value_masks)
    return {
        "selector": mask.meta["selector"],
        "settings": mask.meta["settings"],
        **quality.as_dict(),
        "value_fraction": truth.fraction,
        "n_documents": len(forget),
        "info": mask.meta["info"],
        "cache_key": mask.meta["key"],
        "cached": cached,
        "selection_seconds": mask.meta["seconds"],
        "mask_file": MASK_FILE,
    }


def shown_documents(mask: TokenMask, inputs: SelectionInputs) -> list[list[tuple[str, bool, bool]]]:
    """The first documents as (token text, selected, value token) triples, BOS left out."""
    forget = inputs.forget
    assert forget.offsets is not None
    shown = []
    for i in range(min(SHOWN_DOCUMENTS, len(forget))):
        text = inputs.forget_docs[i]["text"]
        shown.append(
            [
                (text[a:b], selected, truth)
                for (a, b), selected, truth in zip(
                    forget.offsets[i], mask.rows[i], forget.value_masks[i], strict=True
                )
                if b > a
            ]
        )
    return shown


def main(cfg: Any) -> dict[str, Any]:
    """Select, save the mask, measure it, draw it; return the summary."""
    start = time.perf_counter()
    out = Path(cfg.out).expanduser()
    keywords = check_config(cfg)
    key = start_run(
        out,
        "select_tokens",
        cfg,
        cfg.model,
        cfg.data,
        overwrite=cfg.overwrite,
        paths={"keywords": cfg.keywords},
    )
    write_run_info(out, asdict(cfg))
    setup = load_setup(cfg.model, cfg.data)
    model = setup.loaded.hf_model.float()  # as a training run reads it (`run_method`)
    inputs = selection_inputs(setup, cfg.data, model_identity(key, cfg.model), keywords, model)
    mask, cached = cached_selection(selector(cfg.selector_name), cfg.settings, inputs)
    save_token_mask(mask, out / MASK_FILE)
    summary = summarize(mask, inputs, cached) | {"seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    plot_token_masks(
        shown_documents(mask, inputs),
        out / "masks.png",
        title=f"{cfg.selector_name}: {summary['fraction']:.1%} of tokens selected, precision "
        f"{summary['precision']:.2f}, recall {summary['recall']:.2f}",
    )
    print(
        f"{cfg.selector_name}: {summary['n_selected']} of {summary['n_tokens']} tokens "
        f"({summary['fraction']:.1%}); precision {summary['precision']:.3f}, recall "
        f"{summary['recall']:.3f}, F1 {summary['f1']:.3f} against the value tokens "
        f"({summary['value_fraction']:.1%}); wrote {out / MASK_FILE}"
    )
    return summary


def cli(argv: Sequence[str] | None = None) -> None:
    """Read --selector, then run that selector's recipe with the remaining flags."""
    args = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<14}{s.summary}" for name, s in SELECTORS.items())
    parser = argparse.ArgumentParser(
        prog="python -m recipes.select_tokens",
        description=f"Select forget tokens.\n\nselectors:\n{listing}",
        epilog="--selector <name> --help lists the selector's settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("--selector", choices=list(SELECTORS))
    known, rest = parser.parse_known_args(args)
    if known.selector is None:
        parser.print_help()
        raise SystemExit(0 if {"-h", "--help"} & set(rest) else 2)
    run_recipe(main, config_class(known.selector), rest)


if __name__ == "__main__":
    cli()
