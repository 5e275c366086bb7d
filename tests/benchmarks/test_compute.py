"""The compute benchmark: which recipe each leaderboard row ran, and a tiny leaderboard extended
with each row's FLOPs against the filtered twin's pretraining."""

import json

import pytest

from benchmarks import compute, leaderboard


def test_row_recipes_of_a_combined_leaderboard():
    payload = {
        "rows": dict.fromkeys(["unfiltered", "filtered twin", "rmu", "npo", "det_w", "simnpo"]),
        "sources": [
            {"command": "python -m benchmarks.leaderboard"},
            {
                "command": "python -m benchmarks.leaderboard --methods npo --unlearn_args "
                "'--lr 9e-4 --beta 0.03' --results /tmp/x"
            },
            {
                "command": "python -m benchmarks.leaderboard --methods detractor --unlearn_args "
                "'--train_on mask --token_mask values' --label det_w"
            },
        ],
    }
    assert compute.row_recipes(payload) == {
        "rmu": ("rmu", []),
        "npo": ("npo", ["--lr", "9e-4", "--beta", "0.03"]),
        "det_w": ("detractor", ["--train_on", "mask", "--token_mask", "values"]),
        "simnpo": ("simnpo", []),
    }
    payload["rows"]["mystery"] = None
    with pytest.raises(ValueError, match="no run of the leaderboard names its method"):
        compute.row_recipes(payload)
    assert compute.row_steps("npo", ["--num_steps", "7"]) == 7


def test_a_tiny_leaderboard_gets_its_compute(tiny_home, tmp_path):
    board = leaderboard.main(
        leaderboard.Config(
            methods=["checkpoint_transfer"],
            seeds=1,
            world_preset="tiny",
            unlearn_args="--num_steps 3 --batch_size 4",
            num_steps=2,
            out=str(tmp_path / "runs"),
            results=str(tmp_path / "board"),
            device="cpu",
            n_boot=20,
        )
    )
    payload = compute.main(
        compute.Config(
            leaderboard=str(tmp_path / "board" / "leaderboard.json"),
            sample_steps=1,
            results=str(tmp_path / "results"),
        )
    )
    row = payload["rows"]["checkpoint_transfer"]
    assert (row["steps"], row["counted_steps"]) == (3, 1)
    assert row["flops_prepare"] > 0  # the teacher sweep and the maps' activations
    assert row["flops"] == row["flops_own"] == row["flops_prepare"] + row["flops_train"]
    pre = payload["pretraining"]
    assert pre["tokens"] == 40 * 8 * 64  # the tiny preset's steps x rows x context
    assert row["pretraining_fraction"] == pytest.approx(row["flops"] / pre["flops"])
    extended = json.loads((tmp_path / "results" / "leaderboard.json").read_text())
    assert extended["rows"] == json.loads(json.dumps(board["rows"]))
    assert extended["compute"]["checkpoint_transfer"] == pytest.approx(row["pretraining_fraction"])
    table = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "compute (x pretraining)" in table and "| 1.000 |" in table
    assert (tmp_path / "results" / "compute_vs_excess.png").stat().st_size > 0
    assert "checkpoint_transfer" in (tmp_path / "results" / "compute.md").read_text()


def test_seed_flags_put_each_seed_into_the_flags():
    flags = ["--teacher", "runs/circuit_breakers/seed{seed}/run/model", "--lr", "1e-3"]
    assert leaderboard.seed_flags(flags, 2) == [
        "--teacher",
        "runs/circuit_breakers/seed2/run/model",
        "--lr",
        "1e-3",
    ]
