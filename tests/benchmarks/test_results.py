"""The committed result files under benchmarks/results/: portable, with no absolute path."""

import json
from pathlib import Path

import pytest

from tests.conftest import absolute_path_strings
from unlearn.provenance import HOME_PREFIX

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RESULT_FILES = sorted(RESULTS.rglob("*.json"))


def test_there_are_result_files():
    assert len(RESULT_FILES) >= 5


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.relative_to(RESULTS).as_posix())
def test_no_value_is_an_absolute_path(path):
    """Paths are relative to the repository root or start with $UNLEARN_HOME (see provenance)."""
    assert absolute_path_strings(json.loads(path.read_text())) == []


def test_the_methods_benchmark_records_its_world_under_unlearn_home():
    world = json.loads((RESULTS / "methods_toyworld.json").read_text())["world"]
    assert world.startswith(HOME_PREFIX + "/toyworld/default-")


def test_the_methods_markdown_is_its_json_rendered():
    """methods_toyworld.md is `markdown` of methods_toyworld.json: no literal template left."""
    from benchmarks.methods_toyworld import markdown

    text = (RESULTS / "methods_toyworld.md").read_text()
    assert text == markdown(json.loads((RESULTS / "methods_toyworld.json").read_text()))
    assert "{" not in text
