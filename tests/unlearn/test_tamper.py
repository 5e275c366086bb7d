"""Tests for unlearn.tamper and unlearn.tamper_report: attack data, evaluation schedule, resume,
learning-rate schedules, the recovery statistics and the collapse flag.

Statistics are checked on made-up curves whose answers are worked out by hand in each docstring.
"""

import json
import re

import pytest
import torch

import unlearn.tamper as tamper_module
import unlearn.training as training_module
from unlearn.config import replace_flat
from unlearn.experiment import DataConfig, ModelConfig, load_setup
from unlearn.tamper import (
    ATTACK_PRESETS,
    AttackSettings,
    attack,
    excess_over,
    is_collapsed,
    records_from_metrics,
    steps_to_exceed,
)
from unlearn.tamper_report import summarize
from unlearn.training import OptimSettings, learning_rate


@pytest.fixture
def tiny_setup(tiny_home):
    return load_setup(ModelConfig(world_preset="tiny", device="cpu"), DataConfig())


def _items(setup):
    return {"forget_test": setup.test_items, "retain": setup.items["reserved"]["retain"]}


def test_attack_data_holds_no_heldout_fact(tiny_setup, tmp_path, monkeypatch):
    """Every row the attack's training loop can draw decodes to text naming no held-out entity.

    The batches are captured where they enter `unlearn.training.train`, so the test covers the
    whole data path (recipe data -> tokenization -> batching), for every step of the attack.
    """
    captured = {}

    def fake_train(model, method, batches, **kwargs):
        captured["batches"], captured["steps"] = batches, kwargs["num_steps"]
        raise RuntimeError("stop")

    monkeypatch.setattr(tamper_module, "train", fake_train)
    settings = AttackSettings(num_steps=40, batch_size=8)
    with pytest.raises(RuntimeError, match="stop"):
        attack(
            tiny_setup.loaded.hf_model,
            tiny_setup.loaded.tokenizer,
            tiny_setup.forget_docs,
            _items(tiny_setup),
            settings,
            tmp_path,
        )
    world = tiny_setup.world
    heldout = {item["entity"] for item in world.items("forget_heldout", template=None)}
    attacked = {item["entity"] for item in world.items("forget_attack")}
    assert heldout and attacked and not heldout & attacked
    pattern = re.compile("|".join(map(re.escape, heldout)))
    tokenizer, batches = tiny_setup.loaded.tokenizer, captured["batches"]
    seen_attack = set()
    for step in range(captured["steps"]):
        forget, _ = batches.at(step)
        for row in tokenizer.batch_decode(forget.input_ids, skip_special_tokens=True):
            assert not pattern.search(row), row
            seen_attack |= {name for name in attacked if name in row}
    assert seen_attack  # the rows are forget-domain text about attack-split entities


def test_benign_attack_draws_retain_text_only(tiny_setup, tmp_path, monkeypatch):
    captured = {}

    def fake_train(model, method, batches, **kwargs):
        captured["batches"] = batches
        raise RuntimeError("stop")

    monkeypatch.setattr(tamper_module, "train", fake_train)
    with pytest.raises(RuntimeError, match="stop"):
        attack(
            tiny_setup.loaded.hf_model,
            tiny_setup.loaded.tokenizer,
            tiny_setup.forget_docs,
            _items(tiny_setup),
            ATTACK_PRESETS["benign"],
            tmp_path,
            retain_docs=tiny_setup.retain_docs,
        )
    retain_texts = {doc["text"] for doc in tiny_setup.retain_docs}
    tokenizer = tiny_setup.loaded.tokenizer
    forget, _ = captured["batches"].at(0)
    for row in tokenizer.batch_decode(forget.input_ids, skip_special_tokens=True):
        assert any(text.startswith(row) for text in retain_texts), row


def test_eval_schedule_includes_step_zero_and_the_last_step(tiny_setup, tmp_path):
    settings = AttackSettings(num_steps=7, batch_size=4, eval_every=5, early_evals=(2,))
    assert settings.eval_steps() == [0, 2, 5, 7]
    records, _ = attack(
        tiny_setup.loaded.hf_model.float(),
        tiny_setup.loaded.tokenizer,
        tiny_setup.forget_docs,
        _items(tiny_setup),
        settings,
        tmp_path,
    )
    assert [r["step"] for r in records] == [0, 2, 5, 7]
    assert records[0]["loss"] is None and all(r["loss"] > 0 for r in records[1:])
    on_disk = json.loads((tmp_path / "tamper_results.json").read_text())
    assert on_disk["records"] == records and on_disk["settings"]["num_steps"] == 7


def test_resumed_attack_gives_the_same_curve(tiny_home, tmp_path, monkeypatch):
    """An attack killed right after its step-3 state is saved, then rerun, matches one that ran
    through: same records (accuracies and losses) at every evaluated step."""
    settings = AttackSettings(num_steps=6, batch_size=4, eval_every=3, early_evals=(1,))

    def run(out):
        setup = load_setup(ModelConfig(world_preset="tiny", device="cpu"), DataConfig())
        return attack(
            setup.loaded.hf_model.float(),
            setup.loaded.tokenizer,
            setup.forget_docs,
            _items(setup),
            settings,
            out,
        )

    straight, straight_model = run(tmp_path / "straight")
    original_save = training_module._save_state

    def save_then_die(*args, **kwargs):
        original_save(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training_module, "_save_state", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "killed")
    partial = records_from_metrics(tmp_path / "killed" / "attack" / "metrics.jsonl")
    assert [r["step"] for r in partial] == [0, 1, 3]
    resumed, resumed_model = run(tmp_path / "killed")
    assert resumed == straight
    for a, b in zip(straight_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lora_attack_changes_the_model(tiny_setup, tmp_path):
    before = {k: v.clone() for k, v in tiny_setup.loaded.hf_model.state_dict().items()}
    settings = replace_flat(
        AttackSettings(), num_steps=2, batch_size=4, lora_rank=4, lr=1e-2, eval_every=0
    )
    records, model = attack(
        tiny_setup.loaded.hf_model.float(),
        tiny_setup.loaded.tokenizer,
        tiny_setup.forget_docs,
        _items(tiny_setup),
        settings,
        tmp_path,
    )
    assert [r["step"] for r in records] == [0, 2]
    after = model.state_dict()
    assert set(after) == set(before)  # merged: no lora_* keys left
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_attack_errors(tiny_setup, tmp_path):
    model, tok = tiny_setup.loaded.hf_model, tiny_setup.loaded.tokenizer
    with pytest.raises(ValueError, match="exactly one of"):
        attack(model, tok, tiny_setup.forget_docs, {"retain": []}, AttackSettings(), tmp_path)
    both = {"retain": [], "forget_test": [], "forget_dev": []}
    with pytest.raises(ValueError, match="exactly one of"):
        attack(model, tok, tiny_setup.forget_docs, both, AttackSettings(), tmp_path)
    with pytest.raises(ValueError, match="retain_docs"):
        attack(
            model,
            tok,
            tiny_setup.forget_docs,
            _items(tiny_setup),
            ATTACK_PRESETS["benign"],
            tmp_path,
        )
    with pytest.raises(ValueError, match="empty"):
        attack(model, tok, [], _items(tiny_setup), AttackSettings(), tmp_path)
    with pytest.raises(ValueError, match="positive"):
        AttackSettings(num_steps=0)


# --- learning-rate schedules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warmup 2 of peak 1.0: steps 0, 1 -> 0.5, 1.0; then 8 decay steps over span 10 - 2 = 8
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        # linear: 1 - (s - 2) / 8 for s = 2..9
        ("linear", [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
        # cosine: (1 + cos(pi (s - 2) / 8)) / 2; cos(pi/4) = 0.70711, cos(pi/2) = 0, ...
        (
            "cosine",
            [0.5, 1.0, 1.0, 0.96194, 0.85355, 0.69134, 0.5, 0.30866, 0.14645, 0.03806],
        ),
    ],
)
def test_learning_rate_schedules(schedule, expected):
    settings = OptimSettings(lr=1.0, warmup_steps=2, schedule=schedule)
    got = [learning_rate(settings, step, 10) for step in range(10)]
    assert got == pytest.approx(expected, abs=1e-5)


# --- statistics on made-up curves ----------------------------------------------------------------


def _curve(points):
    return [{"step": s, "forget_acc": a, "retain_acc": 0.9} for s, a in points]


def test_excess_over_the_filtered_twin_at_matched_steps():
    """Floor 0.25 -> 0.35 over steps 0 and 100 (0.30 at step 50 by interpolation).
    Ours 0.25, 0.40, 0.70: excess 0, 0.10 and 0.35."""
    ours = _curve([(0, 0.25), (50, 0.40), (100, 0.70)])
    floor = _curve([(0, 0.25), (100, 0.35)])
    assert excess_over(ours, floor) == pytest.approx([0.0, 0.10, 0.35])


def test_steps_to_exceed_the_filtered_twin():
    """Floor 0.26, 0.28, 0.30, 0.30 at steps 0, 10, 20, 30; +10 points: 0.36, 0.38, 0.40, 0.40.
    A curve 0.27, 0.37, 0.41, 0.50 first exceeds at step 20 (0.37 < 0.38 at step 10)."""
    floor = _curve([(0, 0.26), (10, 0.28), (20, 0.30), (30, 0.30)])
    assert steps_to_exceed(_curve([(0, 0.27), (10, 0.37), (20, 0.41), (30, 0.5)]), floor) == 20
    assert steps_to_exceed(_curve([(0, 0.27), (10, 0.30), (20, 0.35), (30, 0.39)]), floor) is None
    assert steps_to_exceed(_curve([(0, 0.5)]), floor) == 0


def test_collapsed_model_is_flagged():
    """Original retain 0.97, chance 0.25: gain 0.72, a quarter of it 0.18, so retain < 0.43 is
    collapsed."""
    assert is_collapsed(0.30, 0.97) and is_collapsed(0.429, 0.97)
    assert not is_collapsed(0.431, 0.97) and not is_collapsed(0.95, 0.97)
    floor = _curve([(0, 0.25), (10, 0.25)])
    collapsed = [
        {"step": 0, "forget_acc": 0.25, "retain_acc": 0.27},
        {"step": 10, "forget_acc": 0.26, "retain_acc": 0.28},
    ]
    summary = summarize(collapsed, ceiling=None, floor=floor, original_retain=0.97)
    assert summary["collapsed"] is True and summary["held"] is True
    healthy = [dict(r, retain_acc=0.95) for r in collapsed]
    assert summarize(healthy, floor=floor, original_retain=0.97)["collapsed"] is False


def test_an_attack_scored_on_dev_needs_no_reporting_and_names_its_split(tiny_setup, tmp_path):
    """Choosing defaults attacks with dev items: scored outside `reporting()`, records say so, and
    the forget accuracy is the dev items' (checked against scoring them directly)."""
    from unlearn.eval import evaluate_mc

    model, tok = tiny_setup.loaded.hf_model, tiny_setup.loaded.tokenizer
    dev = tiny_setup.items["reserved"]["forget_dev"][:12]
    retain = tiny_setup.items["reserved"]["retain"][:8]
    expected = evaluate_mc(model, tok, dev).acc
    settings = AttackSettings(num_steps=1, batch_size=2, max_len=32, early_evals=())
    records, _ = attack(
        model,
        tok,
        tiny_setup.forget_docs,
        {"forget_dev": dev, "retain": retain},
        settings,
        tmp_path,
    )
    assert [r["forget_split"] for r in records] == ["forget_dev", "forget_dev"]
    assert records[0]["forget_acc"] == pytest.approx(expected)
