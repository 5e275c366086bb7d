"""Runs that never lie: output folders keyed by what made them, and recipe errors in one line.

A run folder (a recipe's `--out`) holds `run_key.json`: the recipe, its config and the
`unlearn.keys.result_key` of that config, the content of its inputs (model, data) and the code
version. `claim_run_dir` is called before any model loads: the same command resumes, anything else
(another recipe, config, model or data content, code version, or files of an unkeyed run) raises
`RunMismatchError` saying what differs and how to go on (a new `--out`, or `--overwrite true`,
which clears the folder first). Nothing in a folder is ever mixed with or overwritten by another
run. `unlearn.training.train` keeps the same promise for its own state file.

Recipes parse and run through `run_recipe`: presets and flags are checked against the config's
`Literal` choices (a typo lists the allowed values), and an error prints as one line (the
traceback with `--debug`), while `main(cfg)` still raises for tests and callers.

Usage:
    >>> key = claim_run_dir(cfg.out, "lens_unlearn", asdict(cfg), inputs, overwrite=cfg.overwrite)
    >>> if __name__ == "__main__":
    ...     run_recipe(main, Config)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from unlearn.keys import key_difference, result_key
from unlearn.provenance import portable_paths
from unlearn.ranks import is_main_process, rank_zero_first

RUN_KEY_FILE = "run_key.json"
"""The key of the run a folder holds."""

RUN_INFO_FILE = "run_info.json"
"""What every recipe writes next to its outputs (`unlearn.provenance.write_run_info`)."""

UNKEYED_FIELDS = ("out", "overwrite")
"""Top-level config fields that say where and how to write, not what: left out of the key."""

ConfigT = TypeVar("ConfigT")


class RunMismatchError(ValueError):
    """A folder holds the state or outputs of a run with other settings, inputs or code."""


def _plain(value: Any) -> Any:
    """A JSON-like value as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {
            name: leaf
            for key, item in value.items()
            for name, leaf in _flatten(item, f"{prefix}{key}.").items()
        }
    return {prefix.rstrip("."): value}


def setting_differences(old: Any, new: Any, limit: int = 8) -> list[str]:
    """The dotted names of the settings that differ, each with its old and new value.

    Args:
        old: A JSON-like value (e.g. a stored config).
        new: Another.
        limit: Name at most this many, then say how many more differ.
    """
    before, after = _flatten(_plain(old)), _flatten(_plain(new))
    missing = "(not set)"
    lines = [
        f"{name}: {before.get(name, missing)!r} -> {after.get(name, missing)!r}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name, missing) != after.get(name, missing)
    ]
    if len(lines) > limit:
        lines = [*lines[:limit], f"and {len(lines) - limit} more"]
    return lines


def run_key(recipe: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> dict[str, Any]:
    """The key of a run: `result_key` of the recipe and config, the inputs' content keys and code.

    Args:
        recipe: The recipe's name (a module of `recipes`).
        config: Its config as `dataclasses.asdict` gives it (`UNKEYED_FIELDS` are left out).
        inputs: Content keys of its inputs by name (`unlearn.keys.content_key`).

    Returns:
        `result_key`'s value plus "recipe" and "config" (so that a mismatch can name fields).
    """
    kept = {name: value for name, value in config.items() if name not in UNKEYED_FIELDS}
    settings = {"recipe": recipe, "config": _plain(portable_paths(kept))}
    return {**result_key(settings, dict(inputs)), **settings}


def _read_key(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"unreadable": str(path)}
    return stored if isinstance(stored, dict) else {"unreadable": str(path)}


def _reasons(stored: dict[str, Any] | None, current: dict[str, Any], entries: list[str]) -> str:
    if stored is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        return f"it holds files that no keyed run made ({shown})"
    if "unreadable" in stored:
        return f"its {RUN_KEY_FILE} cannot be read"
    if stored.get("recipe") != current["recipe"]:
        return f"it is a recipes.{stored.get('recipe')} run, not recipes.{current['recipe']}"
    reasons = []
    for part in key_difference(stored, current):
        if part == "settings":
            changed = setting_differences(stored.get("config"), current["config"])
            reasons.append("config " + (", ".join(changed) if changed else "changed"))
        elif part == "code":
            reasons.append(f"the library code changed ({stored.get('code')} -> {current['code']})")
        else:
            name = part.removeprefix("inputs: ")
            reasons.append(f"the content of its input {name!r} differs")
    return "; ".join(reasons) or "its key differs"


def _clear(out: Path, entries: list[str], stored: dict[str, Any] | None) -> None:
    if stored is None and RUN_INFO_FILE not in entries:
        raise RunMismatchError(
            f"--overwrite clears only run folders ({RUN_KEY_FILE} or {RUN_INFO_FILE} in them); "
            f"{out} holds neither ({', '.join(entries[:5])}): choose another --out"
        )
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def claim_run_dir(
    out: str | Path,
    recipe: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Make `out` the folder of this run, or find it already is (a resume); never mix two runs.

    Args:
        out: The run folder (created if missing).
        recipe: The recipe's name.
        config: The recipe's config (`dataclasses.asdict`).
        inputs: Content keys of the inputs by name.
        overwrite: Delete what `out` holds first (only a run folder's contents) and start over.

    Returns:
        The run's key (`run_key`), also written to `out/run_key.json`.

    Raises:
        RunMismatchError: `out` holds another run, or files of no keyed run, and not
            `overwrite`; or `overwrite` of a folder that is not a run folder.
    """
    with rank_zero_first():  # torchrun: rank 0 claims the folder, the others then find it
        return _claim(Path(out).expanduser(), run_key(recipe, config, inputs), overwrite)


def _claim(out: Path, current: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    if out.exists() and not out.is_dir():
        raise RunMismatchError(f"--out {out} is a file, not a folder: choose another --out")
    stored = _read_key(out / RUN_KEY_FILE)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and overwrite and is_main_process():
        _clear(out, entries, stored)
    elif (
        entries
        and (stored is None or stored.get("key") != current["key"])
        and (is_main_process() or not overwrite)
    ):
        raise RunMismatchError(
            f"{out} holds another run ({_reasons(stored, current, entries)}), so this run would "
            "mix with it. Rerun the command that made it to resume it, pass a new --out, or pass "
            f"--overwrite true to delete what {out} holds and start over"
        )
    elif entries:
        return current
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RUN_KEY_FILE + ".tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / RUN_KEY_FILE)
    return current


def _literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) annotation allows; None otherwise."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        members = get_args(hint)
        choices = [c for member in members for c in (_literal_choices(member) or ())]
        if choices:
            return (*choices, *((None,) if type(None) in members else ()))
    return None


def _dataclass_type(hint: Any) -> type | None:
    candidates = [hint, *get_args(hint)]
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)  # type: ignore[return-value]


def _choice_error(name: str, value: Any, choices: Sequence[Any]) -> str:
    flag = name.rpartition(".")[2]
    allowed = ", ".join(repr(choice) for choice in choices)
    return f"{name} (--{flag}) is {value!r}, not one of the allowed values: {allowed}"


def choice_errors(config_cls: type, values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Unknown names and out-of-choice values in a nested mapping (a YAML preset).

    A value outside its field's `Literal` choices is named with the allowed values; an unknown
    name that is a setting of a nested group says which group it belongs to.

    Args:
        config_cls: The dataclass the mapping fills.
        values: Field name -> value, nested for nested dataclasses.
        prefix: Dotted name of `config_cls` within the outer config.
    """
    hints = get_type_hints(config_cls)
    errors = []
    for name, value in values.items():
        if name not in hints:
            errors.append(_unknown_setting(config_cls, hints, str(name), prefix))
            continue
        hint = hints[name]
        nested = _dataclass_type(hint)
        if nested is not None and isinstance(value, Mapping):
            errors += choice_errors(nested, value, f"{prefix}{name}.")
            continue
        choices = _literal_choices(hint)
        if choices is not None and value not in choices:
            errors.append(_choice_error(prefix + name, value, choices))
    return errors


def _unknown_setting(config_cls: type, hints: dict[str, Any], name: str, prefix: str) -> str:
    """Where a preset key that `config_cls` lacks belongs: a nested group's setting, or nowhere."""
    for group, hint in hints.items():
        nested = _dataclass_type(hint)
        if nested is not None and name in {f.name for f in dataclasses.fields(nested)}:
            return f"{prefix}{name} belongs to a group: write it as {prefix}{group}.{name}"
    return f"{prefix}{name} is not a setting of {config_cls.__name__}; its settings: " + ", ".join(
        hints
    )


def check_choices(cfg: Any) -> None:
    """Check every `Literal` field of a (nested) config dataclass instance.

    Raises:
        ValueError: A value outside its field's choices; the message lists the allowed values.
    """
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}

    def as_mapping(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: as_mapping(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value

    errors = choice_errors(type(cfg), {k: as_mapping(v) for k, v in values.items()})
    if errors:
        raise ValueError("; ".join(errors))


def _config_paths(args: Sequence[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(args):
        if arg == "--config_path" and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config_path="):
            paths.append(arg.partition("=")[2])
    return paths


def parse_config(config_cls: type[ConfigT], args: Sequence[str] | None = None) -> ConfigT:
    """Parse a recipe config from flags and an optional `--config_path` YAML preset.

    A preset value outside a `Literal` field's choices is reported with the field's name, the
    preset's file and the allowed values (simple_parsing raises a bare KeyError for it).

    Raises:
        ValueError: A bad choice in a preset or the parsed config, or an unreadable preset.
    """
    from simple_parsing import parse

    args = list(sys.argv[1:] if args is None else args)
    for path in _config_paths(args):
        try:
            values = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read the preset {path}: {err}") from err
        errors = choice_errors(config_cls, values) if isinstance(values, Mapping) else []
        if errors:
            raise ValueError(f"{path}: " + "; ".join(errors))
    cfg = parse(config_cls, args=args, add_config_path_arg=True)
    check_choices(cfg)
    return cfg


def _pop_debug(args: list[str]) -> bool:
    """Remove `--debug [true|false]` (or `--debug=...`) from `args`; whether it was on."""
    debug = False
    for i, arg in enumerate(args):
        if arg == "--debug":
            value = args[i + 1] if i + 1 < len(args) else ""
            has_value = value.lower() in ("true", "false", "1", "0", "yes", "no")
            debug = value.lower() in ("true", "1", "yes") if has_value else True
            del args[i : i + 1 + has_value]
            return debug
        if arg.startswith("--debug="):
            del args[i]
            return arg.partition("=")[2].lower() in ("true", "1", "yes")
    return debug


EXPLAINED_ERRORS = (ValueError, OSError, FloatingPointError)
"""Errors whose message says all there is (no exception type needed in the one-line form)."""


def run_recipe(
    main: Callable[[ConfigT], Any], config_cls: type[ConfigT], argv: Sequence[str] | None = None
) -> None:
    """Parse the config, run `main`, and print an error as one line (its traceback with --debug).

    Args:
        main: The recipe's `main(cfg)`.
        config_cls: Its config dataclass.
        argv: The flags (default: the command line).

    Raises:
        SystemExit: 1 after printing an error (without `--debug`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _pop_debug(args)
    try:
        main(parse_config(config_cls, args))
    except Exception as err:
        if debug:
            raise
        label = "" if isinstance(err, EXPLAINED_ERRORS) else f"{type(err).__name__}: "
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {label}{message} (rerun with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
