"""unlearn.provenance: run_info.json, and portable paths in every result file.

The convention: a path inside $UNLEARN_HOME is written "$UNLEARN_HOME/<relative path>", any other
path relative to the repository root; `resolve_path` reads both back.
"""

import json
from pathlib import Path

import pytest

from tests.conftest import absolute_path_strings
from unlearn.experiment import ModelConfig
from unlearn.provenance import (
    REPO_ROOT,
    portable_path,
    portable_paths,
    resolve_path,
    write_run_info,
)
from unlearn.tamper_report import resolve_model


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "toyworld" / "tiny-abc" / "models" / "filtered").mkdir(parents=True)
    monkeypatch.setenv("UNLEARN_HOME", str(home))
    return home


def test_paths_inside_unlearn_home_are_written_relative_to_it(home):
    world = home / "toyworld" / "tiny-abc"
    assert portable_path(world) == "$UNLEARN_HOME/toyworld/tiny-abc"
    assert portable_path(str(home)) == "$UNLEARN_HOME"
    assert resolve_path("$UNLEARN_HOME/toyworld/tiny-abc") == world.resolve()


def test_other_paths_are_written_relative_to_the_repository_root(home, tmp_path):
    assert portable_path(REPO_ROOT / "benchmarks" / "results") == "benchmarks/results"
    assert resolve_path("benchmarks/results") == REPO_ROOT / "benchmarks" / "results"
    outside = tmp_path / "runs" / "x"
    recorded = portable_path(outside)
    assert recorded.startswith("../") and not recorded.startswith(str(tmp_path))
    assert resolve_path(recorded) == outside.resolve()


def test_resolve_path_keeps_an_absolute_path_from_an_old_file(tmp_path):
    assert resolve_path(str(tmp_path)) == tmp_path


def test_portable_paths_converts_only_paths(home):
    value = {
        "world": home / "toyworld" / "tiny-abc",
        "runs": [str(REPO_ROOT / "runs" / "a"), "EleutherAI/pythia-70m", "toyworld", 3, None],
        "nested": {"out": (str(home),)},
    }
    assert portable_paths(value) == {
        "world": "$UNLEARN_HOME/toyworld/tiny-abc",
        "runs": ["runs/a", "EleutherAI/pythia-70m", "toyworld", 3, None],
        "nested": {"out": ["$UNLEARN_HOME"]},
    }


def test_run_info_holds_no_absolute_path(home, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "sys.argv", [str(REPO_ROOT / "recipes" / "tamper.py"), "--out", str(tmp_path)]
    )
    config = {"out": str(tmp_path / "run"), "model": {"model": str(home / "toyworld")}}
    path = write_run_info(tmp_path / "run", config, extra_path=tmp_path / "x")
    info = json.loads(path.read_text())
    assert absolute_path_strings(info) == []
    assert resolve_path(info["extra_path"]) == (tmp_path / "x").resolve()
    assert info["argv"][0] == "recipes/tamper.py"
    assert info["config"]["model"]["model"] == "$UNLEARN_HOME/toyworld"
    assert resolve_path(info["config"]["out"]) == (tmp_path / "run").resolve()


def test_resolve_model_reads_a_portable_model_directory_back(home, tmp_path):
    """A run whose model was a directory in $UNLEARN_HOME is attacked with that directory."""
    source = home / "toyworld" / "tiny-abc" / "models" / "filtered"
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    write_run_info(run, {"model": {"model": str(source), "world_preset": "tiny"}})
    recorded = json.loads((run / "run_info.json").read_text())["config"]["model"]["model"]
    assert recorded == "$UNLEARN_HOME/toyworld/tiny-abc/models/filtered"
    cfg, weights = resolve_model(str(run), ModelConfig())
    assert Path(cfg.model) == source.resolve() and cfg.world_preset == "tiny"
    assert weights == str(run / "model")


def test_resolve_model_leaves_hub_names_and_the_toy_world_alone(tmp_path):
    for name in ("toyworld", "toyworld:filtered", "EleutherAI/pythia-70m"):
        run = tmp_path / name.replace("/", "_").replace(":", "_")
        (run / "model").mkdir(parents=True)
        write_run_info(run, {"model": {"model": name}})
        assert resolve_model(str(run), ModelConfig())[0].model == name
