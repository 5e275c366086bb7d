"""The on-disk cache of selections, keyed by what made them.

A selection is a function of the selector, its settings, its inputs (the model's content, the
forget and retain rows' token ids, the dev items, the keywords: `SelectionInputs.content_keys`)
and the library code (`unlearn.keys.code_version`). `cached_selection` hashes all of them
(`unlearn.keys.result_key`) and keeps the mask under `$UNLEARN_HOME/token_masks/<selector>-<key>/`
(`mask.safetensors` and `key.json`); a later call with the same key reads it back, any change
computes a new one. Files are written under a temporary name and renamed into place, key.json
last, so a folder with a key.json holds a whole mask. The device is not part of the key: a mask
computed on a GPU is reused on the CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from unlearn.keys import result_key
from unlearn.selection.base import Selection, SelectionInputs, Selector
from unlearn.selection.masks import TokenMask, documents_key, load_token_mask, save_token_mask
from unlearn.toyworld.world import unlearn_home

KEY_FILE = "key.json"


def cache_root() -> Path:
    """Where cached masks live: `$UNLEARN_HOME/token_masks`."""
    return unlearn_home() / "token_masks"


def selection_key(selector: Selector, settings: Any, inputs: SelectionInputs) -> dict[str, Any]:
    """`unlearn.keys.result_key` of a selection: selector and settings, input content, code."""
    return result_key(
        {"selector": selector.name, "settings": asdict(settings)}, inputs.content_keys()
    )


def cached_selection(
    selector: Selector, settings: Any, inputs: SelectionInputs, root: Path | None = None
) -> tuple[TokenMask, bool]:
    """The selector's mask over the forget rows, from the cache or computed (and cached).

    Args:
        selector: The selector.
        settings: Its settings (an instance of `selector.settings`).
        inputs: What it reads.
        root: The cache folder (default `cache_root()`).

    Returns:
        The mask (its `meta` holds the selector, settings, key, what the selector chose and the
        seconds it took), and whether it came from the cache.

    Raises:
        ValueError: Settings of another selector, or whatever the selector raises.
    """
    if not isinstance(settings, selector.settings):
        raise ValueError(
            f"the {selector.name} selector takes {selector.settings.__name__}, "
            f"not {type(settings).__name__}"
        )
    key = selection_key(selector, settings, inputs)
    folder = (root or cache_root()) / f"{selector.name}-{key['key']}"
    if (folder / KEY_FILE).is_file() and json.loads((folder / KEY_FILE).read_text()) == key:
        return load_token_mask(folder), True
    start = time.perf_counter()
    selection: Selection = selector.select(settings, inputs)
    meta = {
        "selector": selector.name,
        "settings": asdict(settings),
        "key": key["key"],
        "info": selection.info,
        "seconds": time.perf_counter() - start,
    }
    mask = TokenMask(selection.masks, documents_key(inputs.forget), meta)
    save_token_mask(mask, folder)
    tmp = folder / (KEY_FILE + ".tmp")
    tmp.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / KEY_FILE)
    return mask, False
