"""Provenance of outputs: the git SHA of the code and the config, written next to every result.

Paths in result files are portable, never absolute: `portable_path` writes a path inside
`$UNLEARN_HOME` as "$UNLEARN_HOME/<relative path>" (e.g. "$UNLEARN_HOME/toyworld/default-<hash>")
and any other path relative to the repository root (e.g. "benchmarks/results"; a path outside the
checkout gets leading ".."). `portable_paths` applies it to every absolute path in a JSON-like
value, and `resolve_path` turns a recorded path back into a path on this machine.

Usage:
    >>> write_run_info(out_dir, asdict(cfg))   # writes out_dir/run_info.json, paths portable
    >>> record = {"world": portable_path(world.root)}
    >>> resolve_path(record["world"])          # the world's directory under this $UNLEARN_HOME
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from unlearn.ranks import is_main_process

_PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = _PACKAGE_DIR.parent
"""The repository root (the checkout this package runs from); recorded paths are relative to it."""
HOME_PREFIX = "$UNLEARN_HOME"
"""How a recorded path inside `$UNLEARN_HOME` starts."""


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=_PACKAGE_DIR, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def git_sha() -> str:
    """The commit of the checkout this package runs from ("+dirty" if it has local changes).

    Returns "unknown" when the package is not inside a git checkout (e.g. installed from a wheel).
    """
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """A short description of the machine: platform, CPU count, torch version and device."""
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _unlearn_home() -> Path:
    # Imported here because unlearn.toyworld imports this module.
    from unlearn.toyworld.world import unlearn_home

    return unlearn_home().resolve()


def portable_path(path: str | os.PathLike[str]) -> str:
    """`path` as result files record it: "$UNLEARN_HOME/<rel>" or relative to the repository root.

    A relative `path` is taken relative to the working directory first.
    """
    resolved = Path(path).expanduser().resolve()
    home = _unlearn_home()
    if resolved.is_relative_to(home):
        inside = resolved.relative_to(home).as_posix()
        return HOME_PREFIX if inside == "." else f"{HOME_PREFIX}/{inside}"
    return Path(os.path.relpath(resolved, REPO_ROOT)).as_posix()


def resolve_path(recorded: str) -> Path:
    """The path on this machine that a recorded path (`portable_path`'s form) names.

    An absolute path (as files written before paths were portable hold) is returned as it is.
    """
    if recorded == HOME_PREFIX or recorded.startswith(HOME_PREFIX + "/"):
        return _unlearn_home() / recorded.removeprefix(HOME_PREFIX).lstrip("/")
    path = Path(recorded).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(REPO_ROOT / path))


def portable_paths(value: Any) -> Any:
    """A copy of a JSON-like value with every `Path` and absolute path string made portable."""
    if isinstance(value, dict):
        return {key: portable_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [portable_paths(item) for item in value]
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.isabs(value)):
        return portable_path(value)
    return value


def write_run_info(
    out_dir: str | Path, config: dict[str, Any], name: str = "run_info.json", **extra: Any
) -> Path:
    """Write the config, git SHA, machine, command line and time to `out_dir/name`.

    Absolute paths anywhere in it (config, command line, `extra`) are written portable
    (`portable_paths`). Under torchrun only rank 0 writes (`unlearn.ranks`).
    """
    path = Path(out_dir) / name
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "config": config,
        "git_sha": git_sha(),
        "machine": machine(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    path.write_text(json.dumps(portable_paths(info), indent=2, sort_keys=True, default=str) + "\n")
    return path
