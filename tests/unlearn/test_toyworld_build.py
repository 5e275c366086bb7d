"""The toy-world build under concurrency and kills: one lock per world, atomic artifacts.

Every test compares the files of a world with those of the session's uninterrupted build of the
same config (`tiny_world`), byte for byte, except the wall-clock fields.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import GPTNeoXForCausalLM

import unlearn.toyworld.build as build_module
import unlearn.toyworld.pretrain as pretrain_module
import unlearn.toyworld.world as world_module
from unlearn.toyworld import build_world, get_preset
from unlearn.toyworld.world import KEYWORD_FILE

REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """Stands for a kill: no `except Exception` in the build can catch it."""


def _digests(world_root: Path) -> dict[str, str]:
    """sha256 of every file the build writes, without its wall-clock time.

    What later runs keep inside a world is not a build artifact: the tamper-control cache
    (tamper_controls/) and the keyword file, written on first use (`KEYWORD_FILE`).
    """
    digests = {}
    for path in sorted(world_root.rglob("*")):
        if not path.is_file() or path.name == "build_seconds.json":
            continue
        if path.relative_to(world_root).parts[0] in ("tamper_controls", KEYWORD_FILE):
            continue
        data = path.read_bytes()
        if path == world_root / "report.json":
            report = json.loads(data)
            del report["build_seconds"]
            data = json.dumps(report, sort_keys=True).encode()
        digests[str(path.relative_to(world_root))] = hashlib.sha256(data).hexdigest()
    return digests


@pytest.fixture(scope="module")
def reference(tiny_world):
    digests = _digests(tiny_world.root)
    for must in ("tokenizer/tokenizer.json", "models/filtered/model.safetensors"):
        assert must in digests
    assert any(name.startswith("data/items/") for name in digests)
    return digests


def _build(root: Path):
    return build_world(get_preset("tiny"), preset="tiny", root=root)


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    import unlearn.toyworld.build as build_module
    import unlearn.toyworld.pretrain as pretrain_module
    from unlearn.toyworld import get_preset

    root, role = Path(sys.argv[1]), sys.argv[2]
    calls = []
    real_pretrain, real_batch_at = build_module.pretrain, pretrain_module.batch_at

    def counting_pretrain(*args, **kwargs):
        calls.append(1)
        return real_pretrain(*args, **kwargs)

    def dying_batch_at(cfg, step, *args):
        if step == 12:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_batch_at(cfg, step, *args)

    build_module.pretrain = counting_pretrain
    if role == "killed":
        pretrain_module.batch_at = dying_batch_at
    else:
        (root.parent / "ready").touch()
        while not (root.parent / "go").exists():
            time.sleep(0.01)
    build_module.build_world(get_preset("tiny"), preset="tiny", root=root)
    print(json.dumps({"pretrain_calls": len(calls)}))
    """
)


def test_concurrent_builds_make_one_world_and_resume_a_killed_one(
    tmp_path, reference, monkeypatch, capsys
):
    """A build is SIGKILLed mid-pretraining while two more builds of the same world start at once.

    The two are a child process and this one. Exactly one of them resumes the killed build (a dead
    process holds no lock); the other waits for it and returns the finished world without
    training. The world is byte-identical to the uninterrupted build. (Without the lock both train
    at once, into the same folders.)
    """
    root = tmp_path / "toyworld"
    env = {**os.environ, "UNLEARN_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    children = {
        role: subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), role],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("killed", "waiter")
    }
    calls = []
    real_pretrain = build_module.pretrain

    def counting_pretrain(*args, **kwargs):
        calls.append(1)
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(build_module, "pretrain", counting_pretrain)
    # Start once the killed build is mid-way through pretraining and the waiter is ready.
    deadline = time.monotonic() + 240
    while not (
        (tmp_path / "ready").exists() and list(root.glob("*/models/unfiltered/checkpoints/step8"))
    ):
        assert time.monotonic() < deadline and children["killed"].poll() is None
        time.sleep(0.01)
    (tmp_path / "go").touch()
    world = _build(root)
    outputs = {role: child.communicate(timeout=240) for role, child in children.items()}
    assert children["killed"].returncode == -9, outputs["killed"][1][-3000:]
    assert children["waiter"].returncode == 0, outputs["waiter"][1][-3000:]
    child_calls = json.loads(outputs["waiter"][0].strip().splitlines()[-1])["pretrain_calls"]
    assert sorted([len(calls), child_calls]) == [0, 2]  # one resumed both runs, one only waited
    waited = capsys.readouterr().err + outputs["waiter"][1]
    assert f"waiting for another process to finish building {world.root}" in waited
    assert _digests(world.root) == reference


def _kill_at_batch(step):
    def arm(monkeypatch):
        real = pretrain_module.batch_at

        def dying(cfg, step_, *args):
            if step_ == step:
                raise Killed
            return real(cfg, step_, *args)

        monkeypatch.setattr(pretrain_module, "batch_at", dying)

    return arm


def _kill_on_call(module, name, call):
    def arm(monkeypatch):
        real, calls = getattr(module, name), []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, dying)

    return arm


def _kill_final_save_before_weights(monkeypatch):
    """The final model's save_pretrained is killed after config.json, before the weights."""
    real = GPTNeoXForCausalLM.save_pretrained

    def dying(self, save_directory, *args, **kwargs):
        real(self, save_directory, *args, **kwargs)
        if not Path(save_directory).name.startswith("step"):  # not a checkpoint
            Path(save_directory, "model.safetensors").unlink()
            raise Killed

    monkeypatch.setattr(GPTNeoXForCausalLM, "save_pretrained", dying)


def test_build_resumes_after_kills_at_every_stage(tmp_path, reference):
    """A build killed in each stage in turn, and rerun each time, ends with the same bytes.

    The kills: while writing the corpora; in the unfiltered run between checkpoints; when the
    final model folder has config.json but no weights; in the filtered run; between checkpoint
    evaluations; after report.json, before the plot and COMPLETE.
    """
    kills = [
        _kill_on_call(build_module, "write_jsonl", 4),
        _kill_at_batch(12),
        _kill_final_save_before_weights,
        _kill_at_batch(35),
        _kill_on_call(build_module, "evaluate_checkpoint", 4),
        _kill_on_call(build_module, "plot_checkpoint_accuracy", 1),
    ]
    root = tmp_path / "toyworld"
    for arm in kills:
        with pytest.MonkeyPatch.context() as monkeypatch:
            arm(monkeypatch)
            with pytest.raises(Killed):
                _build(root)
    world = _build(root)
    assert _digests(world.root) == reference


def test_build_resumes_after_a_kill_after_every_artifact(tmp_path, reference):
    """Killed right after each artifact is renamed into place (each once), the build still resumes.

    `atomic.put_in_place` is the only way an artifact appears, so this walks through every state a
    kill can leave (plus the temporaries of the next artifact, which the resume deletes).
    """
    from unlearn.toyworld import atomic  # the module of put_in_place (new with the lock)

    real = atomic.put_in_place
    seen: list[str] = []

    def dying(tmp, target):
        real(tmp, target)
        name = str(Path(target).relative_to(world_root))
        # Skip files written inside a temporary folder (a kill there leaves only a stale temporary,
        # like the kill before that folder's rename), and build_seconds.json, which every run
        # rewrites: killing there would never end.
        if name not in seen and ".tmp-" not in name and not name.endswith("build_seconds.json"):
            seen.append(name)
            raise Killed

    root = tmp_path / "toyworld"
    world_root = world_module.world_dir(get_preset("tiny"), "tiny", root)
    for _ in range(100):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(atomic, "put_in_place", dying)
            try:
                world = _build(root)
                break
            except Killed:
                assert world_module.ToyWorld(world_root).is_complete == (seen[-1] == "COMPLETE")
    else:
        raise AssertionError(f"still killed after {len(seen)} reruns: {seen}")
    for name in reference:  # every file of the world was in place at one of the kills
        assert any(name == killed or name.startswith(f"{killed}/") for killed in seen), name
    assert _digests(world.root) == reference
    assert not list(world.root.rglob("*.tmp*"))


@pytest.mark.parametrize("name", ["unfiltered", "filtered"])
def test_model_folder_with_config_but_no_weights_is_not_done(tmp_path, tiny_world, reference, name):
    """The state a kill during the final save_pretrained leaves: config.json, no weights.

    It was taken as done: the unfiltered case failed on every rerun ("no file named
    model.safetensors"), the filtered one was marked COMPLETE without weights.
    """
    world_root = tmp_path / "toyworld" / tiny_world.root.name
    shutil.copytree(tiny_world.root, world_root)
    (world_root / "COMPLETE").unlink()
    (world_root / "models" / name / "model.safetensors").unlink()
    assert (world_root / "models" / name / "config.json").exists()
    world = _build(world_root.parent)
    assert _digests(world.root) == reference
    assert world_module.is_saved_model(world.model_dir(name))
    (world.model_dir(name) / "model.safetensors").unlink()
    assert not world_module.is_saved_model(world.model_dir(name))


def test_unresumable_build_says_what_to_delete(tmp_path, tiny_world):
    """A resumed build that cannot go on names the folder to delete and the rebuild command."""
    world_root = tmp_path / "toyworld" / tiny_world.root.name
    shutil.copytree(tiny_world.root, world_root)
    (world_root / "COMPLETE").unlink()
    (world_root / "evals.json").write_text('{"unfiltered": {"0": ')  # damaged, e.g. a full disk
    with pytest.raises(RuntimeError) as error:
        _build(world_root.parent)
    assert str(world_root) in str(error.value)
    assert "--force true" in str(error.value)
    assert "rm -rf" in str(error.value)
