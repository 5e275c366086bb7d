"""The real-model benchmark's pure parts: the worst case over attacks and its settings checks.

(The run itself needs SmolLM2 and minutes per step; `python -m benchmarks.real_model` with the
smoke-test flags of its docstring exercises it end to end.)"""

import json

import pytest

from benchmarks import real_model


def test_the_worst_case_takes_the_highest_forget_and_lowest_retain_at_each_step():
    attacks = {
        "a": {"records": [{"step": 0, "forget_acc": 0.3, "retain_acc": 0.9},
                          {"step": 5, "forget_acc": 0.5, "retain_acc": 0.6}]},
        "b": {"records": [{"step": 0, "forget_acc": 0.3, "retain_acc": 0.9},
                          {"step": 5, "forget_acc": 0.4, "retain_acc": 0.8}]},
    }  # fmt: skip
    assert real_model.worst_case(attacks) == [
        {"step": 0, "forget_acc": 0.3, "retain_acc": 0.9},
        {"step": 5, "forget_acc": 0.5, "retain_acc": 0.6},
    ]
    attacks["b"]["records"].pop()
    with pytest.raises(ValueError):  # attacks evaluated at different steps
        real_model.worst_case(attacks)


def test_bad_settings_fail_before_anything_loads():
    with pytest.raises(ValueError, match="unknown methods"):
        real_model.Config(methods=["nope"])
    with pytest.raises(ValueError, match="--attacks"):
        real_model.Config(attacks=["full_lr1e-2"])
    with pytest.raises(ValueError, match="--attacks"):
        real_model.Config(attacks=[])
    with pytest.raises(ValueError, match="steps"):
        real_model.Config(attack_steps=0)


def test_the_learning_rate_is_chosen_on_dev_by_retain_then_forget_then_the_lower_rate():
    def cand(forget, retain):
        return {"forget_dev": forget, "retain": retain, "retain_before": 0.8}

    # 0.71 < 0.9 * 0.8 = 0.72: 3e-4 forgets most but loses too much retain.
    assert real_model.choose_lr({1e-5: cand(0.6, 0.8), 1e-4: cand(0.4, 0.72),
                                 3e-4: cand(0.3, 0.71)}) == 1e-4  # fmt: skip
    assert real_model.choose_lr({1e-5: cand(0.4, 0.8), 1e-4: cand(0.4, 0.75)}) == 1e-5
    assert real_model.choose_lr({None: cand(0.5, 0.8)}) is None
    with pytest.raises(ValueError, match="add lower rates"):
        real_model.choose_lr({1e-3: cand(0.25, 0.3)})


def test_the_lr_grid_is_parsed_per_method_and_checked():
    cfg = real_model.Config(lr_grid=["grad_diff=1e-5,3e-5"])
    assert cfg.lrs() == {"grad_diff": [1e-5, 3e-5]}
    for bad in ("grad_diff", "grad_diff=", "grad_diff=fast", "grad_diff=-1e-5"):
        with pytest.raises(ValueError, match="must look like"):
            real_model.Config(lr_grid=[bad])
    with pytest.raises(ValueError, match="not in --methods"):
        real_model.Config(lr_grid=["npo=1e-5"])


def test_the_runs_score_the_dev_test_and_retain_items_only(tmp_path):
    items = tmp_path / "world_items"
    items.mkdir()
    for split in ("forget_attack", "forget_dev", "forget_test", "retain"):
        (items / f"{split}.jsonl").write_text(f'{{"split": "{split}"}}\n')
    scored = real_model.scored_items(items, tmp_path / "out")
    assert sorted(p.name for p in scored.iterdir()) == [
        "forget_dev.jsonl",
        "forget_test.jsonl",
        "retain.jsonl",
    ]
    assert (scored / "retain.jsonl").read_text() == (items / "retain.jsonl").read_text()
    assert real_model.scored_items(items, tmp_path / "out") == scored  # made once
    (items / "retain.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="retain"):
        real_model.scored_items(items, tmp_path / "elsewhere")


def test_assembling_reads_finished_runs_and_attacks_with_their_code_versions(tmp_path):
    cfg = real_model.Config(lr_grid=["grad_diff=1e-5,3e-5"], methods=["grad_diff"],
                            attacks=["full_lr1e-3"], attack_steps=2, unlearn_steps=4)  # fmt: skip
    for lr, (forget, retain) in {"1e-05": (0.5, 0.7), "3e-05": (0.3, 0.5)}.items():
        run = tmp_path / "grad_diff" / f"lr{lr}" / "run"
        run.mkdir(parents=True)
        (run / "run_key.json").write_text(json.dumps({"code": f"v-{lr}"}))
        (run / "results.json").write_text(json.dumps({
            "forget_dev_acc": forget, "retain_acc": retain, "retain_acc_before": 0.7,
            "train_seconds": 8.0,
        }))  # fmt: skip
    runs = real_model.assembled_runs(cfg, tmp_path)
    assert runs["grad_diff"]["lr"] == 1e-5  # 3e-5 keeps 0.5 < 0.9 * 0.7 of retain
    assert runs["grad_diff"]["seconds_per_step"] == 2.0
    assert [e["code"] for e in runs["grad_diff"]["dev_sweep"]] == ["v-1e-05", "v-3e-05"]
    with pytest.raises(FileNotFoundError, match="not a finished attack"):
        real_model.assembled_attacks(cfg, "original", tmp_path / "attacks")
    attack = tmp_path / "attacks" / "original" / "full_lr1e-3"
    attack.mkdir(parents=True)
    records = [{"step": s, "forget_acc": 0.5, "retain_acc": 0.6, "loss": 1.0} for s in (0, 2)]
    (attack / "tamper_results.json").write_text(json.dumps({"records": records}))
    (attack / "key.json").write_text(json.dumps({"code": "v-attack"}))
    (attack / "seconds.json").write_text(json.dumps({"seconds": 6.0}))
    got = real_model.assembled_attacks(cfg, "original", tmp_path / "attacks")
    assert got["full_lr1e-3"]["seconds_per_step"] == 3.0
    assert got["full_lr1e-3"]["code"] == "v-attack" and len(got["full_lr1e-3"]["records"]) == 2
    (tmp_path / "grad_diff" / "lr3e-05" / "run" / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        real_model.assembled_runs(cfg, tmp_path)
