"""Data-parallel training under torchrun-style processes (2 gloo ranks on CPU), DDP and FSDP2.

A method with a frozen companion (circuit breakers read the original model) on 2 ranks x 1
micro-batch gives the same metrics, evaluations and final weights as one process x 2
micro-batches over the same global batch; a run interrupted after a saved state resumes to the
same result; the model returned is a plain module with the full weights on every rank.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.ranks import run_module, start_ranks, wait_ranks
from unlearn.config import LoraSettings, OptimSettings
from unlearn.data import PairedBatches
from unlearn.methods.circuit_breakers import CircuitBreakers, CircuitBreakersConfig
from unlearn.training import METRICS_FILE, check_parallel, train

N_LAYERS = 2
STEPS = 3


class Interrupted(Exception):
    """Stands for a kill after a saved state."""


def _run(
    root: Path,
    out: str,
    parallel: str,
    grad_accum: int,
    interrupt_at: int | None = None,
    optimizer: str = "adamw",
):
    """Train the saved model on the saved data (save every 2 steps, evaluate every step)."""
    import unlearn.training as training

    model = torch.load(root / "model.pt", weights_only=False)
    forget, retain = torch.load(root / "data.pt", weights_only=False)
    probe = torch.tensor([forget.ids[0][:5], forget.ids[1][:5]])
    step_once = training._Run.optimizer_step

    def optimizer_step(run, step, lr):
        if step == interrupt_at:
            raise Interrupted
        return step_once(run, step, lr)

    training._Run.optimizer_step = optimizer_step
    try:
        return train(
            model,
            CircuitBreakers(CircuitBreakersConfig(), N_LAYERS),
            PairedBatches(forget, retain, batch_size=4),
            num_steps=STEPS,
            out_dir=root / out,
            optim=OptimSettings(lr=3e-3, warmup_steps=0, grad_accum=grad_accum, parallel=parallel),
            eval_fn=lambda m: {"mean_logit": float(m(probe).logits.double().mean())},
            eval_every=1,
            save_every=2,
            desc=out,
        )
    finally:
        training._Run.optimizer_step = step_once


def parallel_worker(root: str, parallel: str) -> None:
    """Each process: a straight run, an interrupted one and its resumption; final weights.

    Under FSDP2 also a Muon run (whole-matrix orthogonalization of sharded weights).
    """
    import torch.distributed as dist

    root_path, rank = Path(root), os.environ["RANK"]
    if parallel == "fsdp":
        muon = _run(root_path, "fsdp_muon", parallel, grad_accum=1, optimizer="muon")
        torch.save(muon.model.state_dict(), root_path / f"fsdp_muon_rank{rank}.pt")
    result = _run(root_path, parallel, parallel, grad_accum=1)
    torch.save(
        {"weights": result.model.state_dict(), "type": type(result.model).__name__},
        root_path / f"{parallel}_rank{rank}.pt",
    )
    with pytest.raises(Interrupted):
        _run(root_path, f"{parallel}_resumed", parallel, grad_accum=1, interrupt_at=2)
    resumed = _run(root_path, f"{parallel}_resumed", parallel, grad_accum=1)
    torch.save(resumed.model.state_dict(), root_path / f"{parallel}_resumed_rank{rank}.pt")
    dist.destroy_process_group()


def _records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_lm, tmp_path_factory):
    """The saved model and data, and one process x 2 micro-batches on them."""
    model, tokenizer = tiny_lm
    root = tmp_path_factory.mktemp("parallel")
    fresh = type(model)(model.config)  # not the fixture (nnsight hooks may be on it)
    fresh.load_state_dict(model.state_dict())
    torch.save(fresh, root / "model.pt")
    from unlearn.data import tokenize_documents

    texts = ["the cat sat on the mat", "a dog ran far away today", "birds sing at dawn"]
    forget = tokenize_documents(tokenizer, [{"text": t} for t in texts * 2], max_len=16)
    retain = tokenize_documents(tokenizer, [{"text": t[::-1]} for t in texts * 2], max_len=16)
    torch.save((forget, retain), root / "data.pt")
    reference = _run(root, "single", "ddp", grad_accum=2)
    muon = _run(root, "single_muon", "ddp", grad_accum=2, optimizer="muon")
    return root, reference, muon


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_resume(parallel, single):
    root, reference, muon = single
    code = (
        "import sys; from tests.unlearn.test_parallel import parallel_worker; "
        "parallel_worker(sys.argv[1], sys.argv[2])"
    )
    wait_ranks(start_ranks(code, [str(root), parallel]))

    got, want = _records(root / parallel), _records(root / "single")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert any("eval/mean_logit" in r for r in got[1:])  # evaluated during the run
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-7)
    expected = reference.model.state_dict()
    moved = max(
        float((expected[k] - v).abs().max())
        for k, v in torch.load(root / "model.pt", weights_only=False).state_dict().items()
    )
    assert moved > 1e-4  # the runs trained
    for rank in range(2):
        final = torch.load(root / f"{parallel}_rank{rank}.pt", weights_only=False)
        assert final["type"] == type(reference.model).__name__  # a plain module
        torch.testing.assert_close(final["weights"], expected, rtol=1e-5, atol=1e-6)
        resumed = torch.load(root / f"{parallel}_resumed_rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(resumed, expected, rtol=1e-5, atol=1e-6)
        if parallel == "fsdp":
            sharded_muon = torch.load(root / f"fsdp_muon_rank{rank}.pt", weights_only=True)
            torch.testing.assert_close(sharded_muon, muon.model.state_dict(), rtol=1e-4, atol=1e-5)
    if parallel == "fsdp":
        got, want = _records(root / "fsdp_muon"), _records(root / "single_muon")
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, rel=1e-4, abs=1e-6)


def test_what_the_parallel_strategies_refuse_is_said_before_anything_runs():
    check_parallel(OptimSettings(parallel="fsdp", sam_rho=0.1), LoraSettings(8), 1)  # one process
    with pytest.raises(ValueError, match="--parallel ddp"):
        check_parallel(OptimSettings(parallel="fsdp"), LoraSettings(8), 2)
    check_parallel(OptimSettings(parallel="ddp", sam_rho=0.1), LoraSettings(8), 2)
    with pytest.raises(ValueError, match="--sam_rho"):
        check_parallel(OptimSettings(sam_rho=0.1), None, 2)


def test_the_recipes_under_torchrun_match_one_process(tiny_home, tmp_path):
    """`torchrun -m recipes.circuit_breakers` (a frozen companion, sharded too under FSDP2) and
    `-m recipes.tamper` on 2 gloo processes, under DDP and FSDP2, log the same losses and
    accuracies as one process with the same global batch (2 micro-batches); rank 0 alone writes
    the outputs."""
    common = ["--world_preset", "tiny", "--num_steps", "3", "--batch_size", "4",
              "--warmup_steps", "0", "--eval_every", "0"]  # fmt: skip
    runs = {
        "single": (1, ["--grad_accum", "2"]),
        "ddp": (2, []),
        "fsdp": (2, ["--parallel", "fsdp", "--shard_companions", "true"]),
    }
    for label, (nproc, extra) in runs.items():
        unlearned = tmp_path / f"cb_{label}"
        run_module(["recipes.circuit_breakers", *common, *extra, "--out", str(unlearned)], nproc)
        attack = ["--model", str(unlearned), "--early_evals", "2", "--nocontrols"]
        attack += ["--out", str(tmp_path / f"tamper_{label}")]
        run_module(["recipes.tamper", *common, *attack, *extra], nproc)

    def losses(label):
        unlearning = [r for r in _records(tmp_path / f"cb_{label}") if "loss/total" in r]
        tamper = json.loads((tmp_path / f"tamper_{label}" / "tamper_results.json").read_text())
        results = json.loads((tmp_path / f"cb_{label}" / "results.json").read_text())
        return (
            [r["loss/total"] for r in unlearning],
            results["forget_acc"],
            [(r["step"], r["forget_acc"], r["retain_acc"], r["loss"]) for r in tamper["records"]],
        )

    reference = losses("single")
    assert len(reference[0]) == 3 and [r[0] for r in reference[2]] == [0, 2, 3]
    for label in ("ddp", "fsdp"):
        got = losses(label)
        assert got[0] == pytest.approx(reference[0], rel=1e-5)
        assert got[1] == reference[1]
        for g, w in zip(got[2], reference[2], strict=True):
            assert g[:3] == w[:3] and (g[3] is None) == (w[3] is None)
            assert g[3] is None or g[3] == pytest.approx(w[3], rel=1e-5)


@pytest.mark.parametrize(
    ("recipe", "extra", "parallel"),
    [("sequential", [], "fsdp"), ("circuit_breakers", ["--lora_rank", "4"], "ddp")],
    ids=["sequential-fsdp", "lora-ddp"],
)
def test_routing_and_lora_under_torchrun_match_one_process(
    recipe, extra, parallel, tiny_home, tmp_path
):
    """Sequential unlearning (phases training one block each, routed through the frozen original)
    under FSDP2, and a LoRA run (adapters averaged after the backward pass, then merged) under
    DDP, log the same losses and end with the same accuracy as one process."""
    common = ["--world_preset", "tiny", "--num_steps", "3", "--batch_size", "4",
              "--warmup_steps", "0", "--eval_every", "0", *extra]  # fmt: skip
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    run_module([f"recipes.{recipe}", *common, "--grad_accum", "2", "--out", str(single)], 1)
    run_module([f"recipes.{recipe}", *common, "--parallel", parallel, "--out", str(ranks)], 2)

    def losses(out):
        return [r["loss/total"] for r in _records(out) if "loss/total" in r]

    assert len(losses(single)) >= 3
    assert losses(ranks) == pytest.approx(losses(single), rel=1e-5)
    after = [json.loads((out / "results.json").read_text()) for out in (single, ranks)]
    assert after[0]["forget_acc"] == after[1]["forget_acc"]
    assert after[0]["retain_acc"] == after[1]["retain_acc"]
