"""Crash-safe writes for the toy-world build: write under a temporary name, rename into place.

Every artifact of a world (a JSON file, a corpus, the tokenizer folder, a checkpoint folder, a file
of a model folder) is written to `<stem>.tmp-<pid><suffix>` next to its final path and renamed into
place with `os.replace` when it is complete. A kill at any moment therefore leaves each artifact
either whole or absent, plus temporaries; `remove_stale_tmp` deletes those when a build resumes.
Only the holder of a world's lock (see `unlearn.toyworld.build`) writes into it, so every temporary
the lock holder finds is stale.

    with writing(path) as tmp:          # tmp is a sibling path; nothing exists there yet
        tokenizer.save_pretrained(tmp)  # a file or a folder
    # here `path` holds the whole artifact

`put_in_place` is the single commit point: every artifact becomes visible through it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp"
"""Part of every temporary name (`.tmp-<pid>` now; a bare `.tmp` suffix in older builds)."""


def tmp_path(path: Path) -> Path:
    """The temporary sibling of `path` for this process (suffix kept: matplotlib reads it)."""
    return path.with_name(f"{path.stem}{TMP_MARK}-{os.getpid()}{path.suffix}")


def is_tmp(path: Path) -> bool:
    """Whether `path` is a temporary of this module (or of an older build)."""
    return f"{TMP_MARK}-" in path.name or path.name.endswith(TMP_MARK)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def put_in_place(tmp: Path, target: Path) -> None:
    """Rename the finished artifact `tmp` to `target`, replacing what is there."""
    if target.is_dir() and not target.is_symlink():
        # os.replace cannot replace a non-empty folder; a kill between the two steps leaves the
        # artifact absent, and the stage is redone.
        shutil.rmtree(target)
    os.replace(tmp, target)


@contextmanager
def writing(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary path to write `target` at; put it in place if the block succeeds."""
    tmp = tmp_path(target)
    if tmp.exists():
        _remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    yield tmp
    put_in_place(tmp, target)


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_stale_tmp(root: Path) -> list[Path]:
    """Delete every temporary under `root` (call only while holding the lock that guards `root`).

    Returns:
        The paths removed.
    """
    if not root.is_dir():
        return []
    stale: list[Path] = []
    for path in sorted(root.rglob(f"*{TMP_MARK}*")):
        if is_tmp(path) and not any(parent in stale for parent in path.parents):
            stale.append(path)
    for path in stale:
        _remove(path)
    return stale
