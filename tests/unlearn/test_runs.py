"""Tests for runs that never lie (issue 14): run folders keyed by config, inputs and code
(`unlearn.runs`), training states that are finite and keyed (`unlearn.training.train`), and
errors that name what is wrong (`unlearn.runs.parse_config`, `run_recipe`, `unlearn.data`).

Training runs use the session's tiny random GPT-NeoX (`tiny_lm`) for 3 to 4 steps.
"""

import copy
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from interventions import Read
from unlearn.data import PairedBatches, read_documents, read_items, tokenize_documents
from unlearn.keys import result_key
from unlearn.methods import FORGET, TRAINABLE, Stacked, Term
from unlearn.runs import (
    RUN_KEY_FILE,
    RunMismatchError,
    check_choices,
    claim_run_dir,
    parse_config,
    run_recipe,
)
from unlearn.training import METRICS_FILE, STATE_FILE, OptimSettings, train

CONFIG = {"out": "ignored", "training": {"lr": 3e-4, "seed": 0}, "method": {"loss": "random_ce"}}
INPUTS = {"model": "aaaa", "forget_data": "bbbb"}


# --- run folders --------------------------------------------------------------------------------


def test_same_run_resumes_and_a_changed_config_refuses(tmp_path):
    """The same recipe, config and inputs claim the folder again (a resume); a changed config is
    refused with the fields that differ and how to go on, and the folder is left as it was."""
    out = tmp_path / "run"
    key = claim_run_dir(out, "lens_unlearn", CONFIG, INPUTS)
    (out / "results.json").write_text("{}")
    moved = {**CONFIG, "out": "elsewhere"}  # where a run is written is not what it is
    assert claim_run_dir(out, "lens_unlearn", moved, INPUTS)["key"] == key["key"]

    changed = {**CONFIG, "training": {"lr": 1e-2, "seed": 3}}
    with pytest.raises(RunMismatchError) as error:
        claim_run_dir(out, "lens_unlearn", changed, INPUTS)
    message = str(error.value)
    assert "training.lr: 0.0003 -> 0.01" in message and "training.seed: 0 -> 3" in message
    assert "new --out" in message and "--overwrite true" in message
    assert json.loads((out / RUN_KEY_FILE).read_text())["key"] == key["key"]
    assert (out / "results.json").read_text() == "{}"


def test_another_recipe_input_content_or_code_refuses(tmp_path):
    out = tmp_path / "run"
    claim_run_dir(out, "lens_unlearn", CONFIG, INPUTS)
    with pytest.raises(RunMismatchError, match="recipes.lens_unlearn run, not recipes.circuit"):
        claim_run_dir(out, "circuit_breakers", CONFIG, INPUTS)
    with pytest.raises(RunMismatchError, match="input 'forget_data' differs"):
        claim_run_dir(out, "lens_unlearn", CONFIG, {**INPUTS, "forget_data": "cccc"})

    # A run keyed by another version of the library.
    stored = json.loads((out / RUN_KEY_FILE).read_text())
    old = result_key({"recipe": "lens_unlearn", "config": stored["config"]}, INPUTS, code="0+old")
    (out / RUN_KEY_FILE).write_text(json.dumps({**stored, **old}))
    with pytest.raises(RunMismatchError, match=r"library code changed \(0\+old -> "):
        claim_run_dir(out, "lens_unlearn", CONFIG, INPUTS)


def test_files_of_an_unkeyed_run_are_never_overwritten_silently(tmp_path):
    """A folder with another run's outputs but no run_key.json counts as another run; --overwrite
    clears it, but only a run folder: never a folder of other files."""
    out = tmp_path / "old_run"
    out.mkdir()
    (out / "results.json").write_text('{"forget_acc": 0.3}')
    (out / "run_info.json").write_text("{}")
    with pytest.raises(RunMismatchError, match="files that no keyed run made"):
        claim_run_dir(out, "lens_unlearn", CONFIG, INPUTS)
    assert (out / "results.json").read_text() == '{"forget_acc": 0.3}'

    claim_run_dir(out, "lens_unlearn", CONFIG, INPUTS, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [RUN_KEY_FILE]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("keep me")
    with pytest.raises(RunMismatchError, match="--overwrite clears only run folders"):
        claim_run_dir(notes, "lens_unlearn", CONFIG, INPUTS, overwrite=True)
    assert (notes / "thesis.tex").read_text() == "keep me"


# --- training states ----------------------------------------------------------------------------


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a NaN gradient norm)."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _method(model, nan_at_call: int | None = None, sleep: float = 0.0):
    """A next-token NLL on forget rows whose gradient is NaN at the given call (1-based)."""
    calls = []

    def nll(acts, forget, retain):
        calls.append(None)
        time.sleep(sleep)
        loss = -acts["logits"].float().log_softmax(-1)[..., 0].mean()
        return _NanGradient.apply(loss) if len(calls) == nan_at_call else loss

    return Stacked(
        nodes=(Read("logits", "unembed", model=TRAINABLE, batch=FORGET),),
        terms=(Term("forget", nll),),
    )


@pytest.fixture(scope="module")
def batches(tiny_lm):
    _, tokenizer = tiny_lm
    docs = [{"text": text} for text in ("Velkor is spread by ticks.", "Alice lives in Paris.")]
    rows = tokenize_documents(tokenizer, docs * 3, max_len=16)
    return PairedBatches(rows, rows, batch_size=2)


def _finite_state(out) -> bool:
    state = torch.load(out / STATE_FILE, weights_only=False)
    tensors = list(state["params"].values()) + [
        v
        for opt in state["optimizers"]
        for per_param in opt["state"].values()
        for v in per_param.values()
        if torch.is_tensor(v) and v.is_floating_point()
    ]
    return all(torch.isfinite(t).all() for t in tensors)


def test_a_nan_gradient_stops_with_the_last_finite_state_and_a_fixed_rerun_resumes(
    tiny_lm, batches, tmp_path
):
    """The loss stays finite but the gradient is NaN at step 3: the run stops there and the state
    on disk is step 2's, finite (it used to take the step and save NaN weights). Rerunning with
    the method fixed resumes from step 2 and finishes with finite weights."""
    model, _ = tiny_lm
    kwargs = dict(num_steps=4, out_dir=tmp_path, save_every=1, optim=OptimSettings(lr=1e-3))
    with pytest.raises(FloatingPointError) as error:
        train(copy.deepcopy(model), _method(model, nan_at_call=3), batches, **kwargs)
    message = str(error.value)
    assert re.search(r"gradient norm is nan .*at step 3\b", message), message
    assert "last good state (step 2)" in message and "--on_nonfinite skip" in message
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["step"] == 2 and _finite_state(tmp_path)

    result = train(copy.deepcopy(model), _method(model), batches, **kwargs)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert _finite_state(tmp_path) and all(
        torch.isfinite(p).all() for p in result.model.parameters()
    )


def test_skip_mode_skips_and_counts_nonfinite_steps(tiny_lm, batches, tmp_path):
    """on_nonfinite="skip": the NaN-gradient step 2 makes no update and is counted, logged and
    warned about; the weights stay finite and the run finishes."""
    model, _ = tiny_lm
    with pytest.warns(RuntimeWarning, match="1 of 3 steps were skipped"):
        result = train(
            copy.deepcopy(model),
            _method(model, nan_at_call=2),
            batches,
            num_steps=3,
            out_dir=tmp_path,
            optim=OptimSettings(lr=1e-3),
            on_nonfinite="skip",
        )
    assert result.skipped_steps == 1
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 1]
    assert math.isnan(records[1]["grad_norm"]) and math.isfinite(records[2]["grad_norm"])
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["skipped_steps"] == 1 and _finite_state(tmp_path)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_resume_with_other_settings_refuses_and_train_seconds_count_every_segment(
    tiny_lm, batches, tmp_path, monkeypatch
):
    """A run killed after its step-2 state: resuming with another learning rate is refused (it
    used to train half at each); resuming with the same settings reports the time of both
    segments (each step sleeps 0.15 s, so 4 steps take at least 0.6 s)."""
    model, _ = tiny_lm
    method = _method(model, sleep=0.15)
    kwargs = dict(num_steps=4, out_dir=tmp_path, save_every=2, optim=OptimSettings(lr=1e-3))
    original_at = PairedBatches.at

    def dies_at_step_3(self, step, *args, **kw):
        if step == 2:
            raise KeyboardInterrupt
        return original_at(self, step, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(PairedBatches, "at", dies_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(copy.deepcopy(model), method, batches, **kwargs)
    first = torch.load(tmp_path / STATE_FILE, weights_only=False)["elapsed_seconds"]
    assert first >= 0.3

    with pytest.raises(RunMismatchError, match=r"optim\.lr: 0\.001 -> 0\.003"):
        train(copy.deepcopy(model), method, batches, **{**kwargs, "optim": OptimSettings(lr=3e-3)})
    start = time.perf_counter()
    result = train(copy.deepcopy(model), method, batches, **kwargs)
    segment = time.perf_counter() - start
    assert result.train_seconds >= 0.6 and result.train_seconds >= first + 0.3
    assert result.train_seconds > segment


# --- clear errors -------------------------------------------------------------------------------


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    bad_json = tmp_path / "forget.jsonl"
    bad_json.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(ValueError, match=r"forget\.jsonl:3: not valid JSON"):
        read_documents(bad_json)
    no_text = tmp_path / "retain.jsonl"
    no_text.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r'retain\.jsonl:2: a document needs a "text" string'):
        read_documents(no_text)
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "p", "choices": ["a", "b"]}\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:1: an item needs \['answer'\]"):
        read_items(items)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_documents(tmp_path / "missing.jsonl", "forget data")


@dataclass
class _Inner:
    ramp: Literal["constant", "linear"] = "constant"
    """A choice."""


@dataclass
class _Config:
    out: str = "x"
    """Where."""
    inner: _Inner = field(default_factory=_Inner)
    schedule: Literal["a", "b"] | None = None
    """An optional choice."""


def test_a_bad_choice_lists_the_allowed_values(tmp_path):
    """A YAML preset typo used to be a bare KeyError('linaer') from simple_parsing."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("inner:\n  ramp: linaer\n")
    with pytest.raises(ValueError) as error:
        parse_config(_Config, ["--config_path", str(preset)])
    assert "inner.ramp (--ramp) is 'linaer'" in str(error.value)
    assert "'constant', 'linear'" in str(error.value) and "preset.yaml" in str(error.value)
    with pytest.raises(ValueError, match=r"schedule \(--schedule\) is 'c', .*'a', 'b', None"):
        check_choices(_Config(schedule="c"))  # type: ignore[arg-type]
    assert parse_config(_Config, ["--ramp", "linear"]).inner.ramp == "linear"


def test_run_recipe_prints_one_line_and_raises_with_debug(capsys):
    def main(cfg):
        raise ValueError(f"something is\nwrong with {cfg.out}")

    with pytest.raises(SystemExit) as exit_info:
        run_recipe(main, _Config, ["--out", "y"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: something is wrong with y (rerun with --debug for the traceback)\n"
    with pytest.raises(ValueError, match="something is"):
        run_recipe(main, _Config, ["--out", "y", "--debug"])
