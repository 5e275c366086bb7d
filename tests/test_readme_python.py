"""README.md's Python blocks run, in order, in one namespace, on the tiny toy world.

Every ```python block is executed as written, with `$UNLEARN_HOME` at the session's tiny world (so
nothing is built twice) and the working directory a temporary one (so files a block writes land
there). Two tables say what differs from a reader's session, and each entry must still match the
README, so an edited block cannot go silently unrun:

- `NOT_RUN`: blocks that need what a CPU test machine lacks (a hub download, a GPU, an NDIF
  account, real data sets), found by a string they contain;
- `REWRITES`: text replaced before running, for blocks written for the default world (a
  5.5-minute build) so that they run on the tiny one.

A failing block's traceback names README.md and the line in it.
"""

import linecache
import re
from pathlib import Path

from unlearn.toyworld import get_preset

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

NOT_RUN = {
    '"EleutherAI/deep-ignorance-pretraining-stage-unfiltered"': "downloads a hub model to a GPU",
    "set_default_api_key": "needs an NDIF account and the network",
    "run_lm_eval(model, tokenizer, tasks)": "needs WMDP/MMLU data files "
    "(tests/unlearn/test_lm_eval.py runs the same calls on stand-ins)",
}
REWRITES = {
    'get_preset("default"), preset="default"': 'get_preset("tiny"), preset="tiny"',
    # the tiny world's stage boundary, as step400 is the default world's
    'checkpoint="step400"': f'checkpoint="step{get_preset("tiny").stage1_steps}"',
}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(README line of the block's first code line, code) of every ```python block."""
    return [
        (text.count("\n", 0, match.start(1)) + 1, match.group(1))
        for match in PYTHON_BLOCK.finditer(text)
    ]


def test_readme_python_blocks_run(tiny_home, tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert blocks, f"no ```python blocks in {README}"
    not_found = [key for key in NOT_RUN if not any(key in code for _, code in blocks)]
    assert not not_found, f"NOT_RUN entries that match no README block: {not_found}"
    unused = [old for old in REWRITES if not any(old in code for _, code in blocks)]
    assert not unused, f"REWRITES entries that match no README block: {unused}"

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for line, code in blocks:
        if any(key in code for key in NOT_RUN):
            continue
        for old, new in REWRITES.items():
            code = code.replace(old, new)
        # Padded to the block's place in the README, and registered as that file's source, so a
        # traceback names the README line and nnsight can read the source of a trace block.
        source = "\n" * (line - 1) + code
        filename = f"{README} (python block at line {line})"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            exec(compile(source, filename, "exec"), namespace)
        finally:
            linecache.cache.pop(filename, None)
