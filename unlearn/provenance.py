"""Provenance of outputs: the git SHA of the code and the config, written next to every result.

Usage:
    >>> write_run_info(out_dir, asdict(cfg))   # writes out_dir/run_info.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent


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


def write_run_info(
    out_dir: str | Path, config: dict[str, Any], name: str = "run_info.json", **extra: Any
) -> Path:
    """Write the config, git SHA, machine, command line and time to `out_dir/name`."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "config": config,
        "git_sha": git_sha(),
        "machine": machine(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    path.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return path
