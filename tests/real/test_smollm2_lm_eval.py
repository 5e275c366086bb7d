"""lm-eval and the built-in scorer on a real model: the same items give the same scores.

The built-in scorer runs with ``prepend_bos=False``, lm-eval's convention (see
`unlearn.lm_eval_scoring`). Tests never reach the network (`no_network`).
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[real]'")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install -e '.[real]'")

from unlearn.eval import evaluate_mc, score_continuations
from unlearn.lm_eval_scoring import run_lm_eval
from unlearn.lm_eval_tasks import benchmark_items, export_items, mmlu_task, wmdp_bio_robust_task

DATA = Path(__file__).parent.parent / "unlearn" / "data"

ITEMS = [
    {
        "prompt": "The capital of France is",
        "choices": [" Paris", " Rome", " Berlin", " Madrid"],
        "answer": 0,
    },
    {
        "prompt": "The largest planet in the Solar System is",
        "choices": [" Mars", " Jupiter", " Venus", " Mercury"],
        "answer": 1,
    },
    {
        "prompt": "Water freezes at a temperature of zero degrees",
        "choices": [" Fahrenheit", " Kelvin", " Celsius", " Rankine"],
        "answer": 2,
    },
    {
        "prompt": "The opposite of hot is",
        "choices": [" cold", " warm", " loud", " tall"],
        "answer": 0,
    },
    {
        "prompt": "A baby cat is called a",
        "choices": [" puppy", " calf", " foal", " kitten"],
        "answer": 3,
    },
    {"prompt": "Bees make", "choices": [" honey", " milk", " silk", " wool"], "answer": 0},
]


pytestmark = pytest.mark.usefixtures("no_network")


def _assert_same_as_builtin(model, tokenizer, items, result, *, compare_scores=True):
    """Item by item: acc and acc_norm credit, and (if asked) every choice's log-likelihood."""
    builtin = evaluate_mc(model, tokenizer, items, prepend_bos=False)
    assert result.correct == builtin.correct
    assert result.correct_norm == builtin.correct_norm == result.correct_bytes
    if compare_scores:
        contexts = [item["prompt"] for item in items for _ in item["choices"]]
        continuations = [choice for item in items for choice in item["choices"]]
        scores = score_continuations(model, tokenizer, contexts, continuations, prepend_bos=False)
        torch.testing.assert_close(
            torch.tensor(result.loglikelihoods, dtype=torch.float64),
            scores.view(len(items), -1),
            atol=1e-3,
            rtol=1e-5,
        )
    return builtin


def test_items_score_the_same_with_both_evaluators(smollm2, tmp_path):
    model, tokenizer = smollm2.hf_model, smollm2.tokenizer
    task = export_items(ITEMS, tmp_path, name="smollm2_facts")
    result = run_lm_eval(smollm2.model, tokenizer, [task], batch_size=8)["smollm2_facts"]
    builtin = _assert_same_as_builtin(model, tokenizer, ITEMS, result)
    assert result.acc == builtin.acc >= 5 / 6  # it knows these facts


def test_wmdp_and_mmlu_tasks_on_the_standins(smollm2, tmp_path):
    """Two rows of each stand-in (about 70-token prompts: the unembedding dominates on a CPU)."""
    model, tokenizer = smollm2.hf_model, smollm2.tokenizer
    rows, tasks = {}, []
    for name, make_task in [("wmdp_bio_robust", wmdp_bio_robust_task), ("mmlu", mmlu_task)]:
        lines = (DATA / f"{name}_standin.jsonl").read_text().splitlines()[:2]
        rows[name] = [json.loads(line) for line in lines]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        tasks.append(make_task(tmp_path / f"{name}.jsonl", tmp_path))
    results = run_lm_eval(model, tokenizer, tasks, batch_size=8)
    for name, result in results.items():
        assert result.n == 2 and result.acc_norm == result.acc
        items = benchmark_items(rows[name], name)
        _assert_same_as_builtin(model, tokenizer, items, result, compare_scores=False)
