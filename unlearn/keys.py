"""Keys for runs and caches: what a result was made from, hashed, so that nothing stale is reused.

A cached or resumed result is valid only for the settings, the input content and the code that
made it. `result_key` hashes all three; a caller stores the key next to the result and recomputes
(or refuses to resume) when the key it would make now differs.

- `code_version()`: the package version plus a hash of the library's source files (`unlearn/`,
  `interventions/`): the content of the library's git tree, dirty or not, and defined without git.
- `content_key(path)`: a hash of a file's or a directory's content (a saved model, a data file).
- `settings_key(value)`: a hash of a JSON-like value (a config as `dataclasses.asdict` gives it).

Usage:
    >>> key = result_key(settings=asdict(cfg), inputs={"model": content_key(model_dir)})
    >>> if read_key(out) != key: recompute()
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARY_DIRS = ("unlearn", "interventions")
"""Packages whose source defines what a result means (recipes and benchmarks only drive them)."""

_REPO_ROOT = Path(__file__).resolve().parent.parent

_BIG_FILE = 64 * 2**20
"""Files larger than this are keyed by their size and their first and last MiB (model weights of
real models: hashing tens of GB on every run would cost minutes)."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _canonical(value: Any) -> bytes:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode()


def settings_key(value: Any) -> str:
    """A short hash of a JSON-like value or a dataclass (key order does not matter)."""
    return _digest(_canonical(value))


def _file_hash(path: Path, hasher: Any) -> None:
    size = path.stat().st_size
    hasher.update(f"{size}:".encode())
    with path.open("rb") as handle:
        if size <= _BIG_FILE:
            for chunk in iter(lambda: handle.read(2**20), b""):
                hasher.update(chunk)
        else:
            hasher.update(handle.read(2**20))
            handle.seek(size - 2**20)
            hasher.update(handle.read(2**20))


def content_key(path: str | os.PathLike[str], *, exclude: tuple[str, ...] = ()) -> str:
    """A short hash of a file's content, or of every file under a directory (names included).

    Args:
        path: A file or a directory (e.g. a model saved with `save_pretrained`).
        exclude: Top-level entries of a directory to leave out (e.g. "checkpoints").

    Raises:
        FileNotFoundError: Nothing at `path`.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot key {root}: it does not exist")
    hasher = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        relative = file.relative_to(root) if file != root else Path(file.name)
        if relative.parts and relative.parts[0] in exclude:
            continue
        hasher.update(relative.as_posix().encode() + b"\0")
        _file_hash(file, hasher)
    return hasher.hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """The package version and a hash of the library's .py files, computed once per process."""
    try:
        version = metadata.version("unlearn")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    hasher = hashlib.sha256()
    for name in LIBRARY_DIRS:
        for file in sorted((_REPO_ROOT / name).rglob("*.py")):
            hasher.update(file.relative_to(_REPO_ROOT).as_posix().encode() + b"\0")
            hasher.update(file.read_bytes())
    return f"{version}+{hasher.hexdigest()[:12]}"


def result_key(
    settings: Any, inputs: dict[str, str] | None = None, *, code: str | None = None
) -> dict[str, Any]:
    """What a result is keyed by, with its hash under "key".

    Args:
        settings: The settings that made it (a dataclass or JSON-like value).
        inputs: Content keys of its inputs by name (`content_key` of models and data files).
        code: The code version (default: `code_version()`).

    Returns:
        {"key": hash, "settings": settings hash, "inputs": inputs, "code": code version}.
    """
    parts = {
        "settings": settings_key(settings),
        "inputs": dict(sorted((inputs or {}).items())),
        "code": code_version() if code is None else code,
    }
    return {"key": settings_key(parts), **parts}


def key_difference(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Which parts of two `result_key` values differ ("settings", "inputs: model", "code")."""
    diffs = [part for part in ("settings", "code") if stored.get(part) != current.get(part)]
    old, new = stored.get("inputs", {}), current.get("inputs", {})
    diffs += [
        f"inputs: {name}"
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    ]
    return diffs
