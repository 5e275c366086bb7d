"""Unlearn with any registered method on the toy world (or any causal LM).

`python -m recipes.unlearn --method <name>` loads the model (the toy world's unfiltered model by
default, building the world on first use), lets the method prepare its plan (teacher selection,
maps, probes, rewritten targets, one phase per block, ...), evaluates, trains, evaluates again and
writes run_info.json, metrics.jsonl, training.png, model/ and results.json to --out
(`unlearn.experiment.run_method`). `--method <name> --help` lists that method's settings next to
the shared model, data and training groups; each method's defaults are its registration's
(`unlearn.methods.REGISTRY`). The per-method recipes (`python -m recipes.lens_unlearn`, ...) are
presets of this one.

Commands:
    python -m recipes.unlearn --method lens_unlearn --out runs/lens_unlearn
    python -m recipes.unlearn --method sequential --help
    python -m recipes.unlearn --method circuit_breakers --out /tmp/smoke --world_preset tiny \
        --num_steps 2 --batch_size 4
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, field, make_dataclass
from pathlib import Path
from typing import Any

import simple_parsing

from unlearn.config import replace_flat
from unlearn.experiment import DataConfig, ModelConfig, TrainingConfig, run_method, summary_table
from unlearn.keys import result_key
from unlearn.methods import REGISTRY, registration
from unlearn.runs import parse_config, run_recipe
from unlearn.tamper_report import prepare_keyed

OVERWRITE_HELP = (
    "Delete what --out holds and start over (a rerun without it resumes the same run and refuses "
    "any other: another recipe, config, model, data or code version)."
)


@functools.cache
def config_class(name: str, extra: tuple[tuple[str, type, Any], ...] = ()) -> type:
    """The recipe config of method `name`: out, overwrite, model, data, training, method.

    Args:
        name: A registered method.
        extra: Further (name, type, simple_parsing field) entries of a preset's own flags.

    Raises:
        ValueError: An unknown method.
    """
    method = registration(name)
    fields = [
        (
            "out",
            str,
            simple_parsing.field(
                default=f"runs/{name}", help="Output directory (rerun the same command to resume)."
            ),
        ),
        ("overwrite", bool, simple_parsing.field(default=False, help=OVERWRITE_HELP)),
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        ("data", DataConfig, field(default_factory=method.data)),
        ("training", TrainingConfig, field(default_factory=method.training)),
        ("method", method.config, field(default_factory=method.default_config)),
        *extra,
    ]
    camel = "".join(part.title() for part in name.split("_"))
    cls = make_dataclass(f"{camel}RecipeConfig", fields, namespace={"method_name": name})
    cls.__doc__ = method.summary
    cls.__module__ = __name__
    return cls


def run(cfg: Any) -> dict[str, Any]:
    """Run the method of a `config_class` config; print the summary; return results.json's."""
    results = run_method(
        registration(cfg.method_name),
        cfg.method,
        cfg.model,
        cfg.data,
        cfg.training,
        cfg.out,
        cfg,
        overwrite=cfg.overwrite,
    )
    print(summary_table(results))
    print(f"{cfg.method_name}: {cfg.out}")
    return results


def run_keyed(
    name: str,
    args: Sequence[str],
    out: Path,
    retain_coef: float | None = None,
    inputs: dict[str, str] | None = None,
) -> tuple[Path, float]:
    """Run a method into out/run, or reuse it if it was made under the same key.

    The key (`unlearn.keys.result_key`) covers the method, its whole parsed config, `inputs`
    (content keys, e.g. of the world) and the code version; a mismatch deletes `out` and reruns.

    Args:
        name: A registered method.
        args: Flags of its recipe config.
        out: Directory of this run (the run goes to out/run).
        retain_coef: Override the method's retain coefficient (0 for the ablation).
        inputs: Further content keys of what the run depends on.

    Returns:
        The run's directory and the wall seconds it took (0 when reused).
    """
    run_dir = out / "run"
    cfg = parse_config(config_class(name), [*args, "--out", str(run_dir)])
    if retain_coef is not None:
        cfg = replace_flat(cfg, retain_coef=retain_coef)
    key = result_key({"recipe": name, "config": asdict(cfg)}, inputs)
    if prepare_keyed(out, key, done="run/results.json"):
        return run_dir, 0.0
    start = time.perf_counter()
    run(cfg)
    return run_dir, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    """Read --method, then run that method's recipe with the remaining flags."""
    args = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<22}{reg.summary}" for name, reg in REGISTRY.items())
    parser = argparse.ArgumentParser(
        prog="python -m recipes.unlearn",
        description=f"Unlearn with a registered method.\n\nmethods:\n{listing}",
        epilog="--method <name> --help lists the method's settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("--method", choices=list(REGISTRY))
    known, rest = parser.parse_known_args(args)
    if known.method is None:
        parser.print_help()
        raise SystemExit(0 if {"-h", "--help"} & set(rest) else 2)
    run_recipe(run, config_class(known.method), rest)


if __name__ == "__main__":
    main()
