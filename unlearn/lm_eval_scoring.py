"""lm-eval (EleutherAI's LM Evaluation Harness, 0.4.x) as a second evaluator, offline, in process.

`run_lm_eval` wraps a model already in memory (loaded, unlearned, LoRA-merged, or a peft model) and
its tokenizer in lm-eval's `HFLM` and runs local tasks (`unlearn.lm_eval_tasks`) with
`lm_eval.simple_evaluate`, returning `acc`, `acc_norm` and `acc_bytes` overall and per item
(`LMEvalResult`). `evaluate_items_lm_eval` exports one list of items and scores it; `evaluate_with`
picks the built-in scorer or lm-eval by name (`Evaluator`). A failed or partial evaluation raises
(`LMEvalError`); there is no default score.

How lm-eval 0.4.x scores a multiple-choice item, and where the built-in scorer (`unlearn.eval`)
differs (read from `lm_eval/api/task.py`, `lm_eval/api/model.py`,
`lm_eval/models/huggingface.py`):

- Requests are (context, target_delimiter + choice); for exported items that is exactly
  (prompt, choice), as in `unlearn.eval` (see `unlearn.lm_eval_tasks`).
- Tokens: the continuation's tokens are those of context + continuation past the context's,
  like the built-in scorer; lm-eval first moves trailing spaces of the context into the
  continuation, and does not fall back when the boundary tokens merge (the built-in scorer then
  tokenizes the continuation on its own). Neither arises with prompts that end without a space
  and choices that start with one.
- BOS: lm-eval's `HFLM` adds no token of its own before a non-empty context; only what the
  tokenizer adds (nothing for the toy world's tokenizer or SmolLM2's). The built-in scorer puts BOS
  (or EOS) first by default (`prepend_bos=True`), so its default numbers differ; with
  ``prepend_bos=False`` it scores the same tokens.
- ``acc`` is the argmax of the summed log-likelihoods (numpy's argmax: the first of tied choices
  wins); the built-in scorer shares credit among choices within 1e-5 nats (1/k each).
- ``acc_norm`` divides each log-likelihood by the choice's length in *characters*
  (``len(choice)``, the delimiter not included); ``acc_bytes`` by its length in UTF-8 bytes. The
  built-in ``acc_norm`` divides by UTF-8 bytes of the choice with its space: for exported items it
  equals lm-eval's ``acc_bytes`` always, and lm-eval's ``acc_norm`` when the choices are ASCII.
  For WMDP and MMLU every choice has the same length, so ``acc_norm`` equals ``acc`` everywhere.
- Log-probabilities: lm-eval sums float32 log-softmax values; the built-in scorer sums them in
  float64. Differences are about 1e-5 nats, enough to flip only a near tie.
- lm-eval truncates a request longer than the model's context from the left, with a warning;
  `run_lm_eval` refuses such items instead.

Usage:
    >>> task = export_items(world.items("retain"), "/tmp/tasks", name="toyworld_retain")
    >>> result = run_lm_eval(loaded.model, loaded.tokenizer, [task])["toyworld_retain"]
    >>> result.acc, result.acc_norm, result.correct
    >>> evaluate_with("lm_eval", loaded.model, loaded.tokenizer, items).acc
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from interventions import unwrap
from unlearn.eval import TEST_SPLIT, MCResult, check_not_test, evaluate_mc
from unlearn.lm_eval_tasks import METRICS, LocalTask, export_items, offline_datasets

LM_EVAL_INSTALL = 'pip install -e ".[real]"'
"""How to install lm-eval (and accelerate, which its `HFLM` needs) with this library's extra."""


class LMEvalError(RuntimeError):
    """lm-eval did not score every item of every task, or returned something unusable."""


@dataclass(frozen=True)
class LMEvalResult:
    """lm-eval's multiple-choice scores of one task, overall and per item (in data-file order)."""

    acc: float
    """Mean of `correct`."""
    acc_norm: float
    """Mean of `correct_norm`."""
    acc_bytes: float
    """Mean of `correct_bytes`."""
    n: int
    """Number of items."""
    correct: tuple[float, ...]
    """Per item: 1 if the highest summed log-likelihood is the answer's (first of ties), else 0."""
    correct_norm: tuple[float, ...]
    """The same with log-likelihood per character of the choice."""
    correct_bytes: tuple[float, ...]
    """The same with log-likelihood per UTF-8 byte of the choice."""
    loglikelihoods: tuple[tuple[float, ...], ...]
    """Per item, the summed log-likelihood of each choice."""
    contexts: tuple[str, ...]
    """Per item, the context lm-eval built (description and prompt)."""

    def as_mc_result(self) -> MCResult:
        """The summary in `unlearn.eval.MCResult` form (acc, acc_norm, per-item acc credit)."""
        return MCResult(acc=self.acc, acc_norm=self.acc_norm, n=self.n, correct=self.correct)


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{what} needs the `{module}` package, which is not installed; install it with "
            f"`{LM_EVAL_INSTALL}`"
        )


Evaluator = Literal["builtin", "lm_eval"]
"""Which scorer evaluates items: `unlearn.eval.evaluate_mc` or `evaluate_items_lm_eval`."""


def _task_result(
    output: Mapping[str, Any], task: LocalTask, tokenizer: Any, max_length: int
) -> LMEvalResult:
    """One task's per-item scores from `simple_evaluate`'s output, checked to be complete."""
    samples = output.get("samples", {}).get(task.name)
    if samples is None:
        raise LMEvalError(f"lm-eval returned no per-item results for task {task.name!r}")
    by_doc = {int(sample["doc_id"]): sample for sample in samples}
    if len(samples) != task.n_docs or sorted(by_doc) != list(range(task.n_docs)):
        raise LMEvalError(
            f"lm-eval scored {len(by_doc)} distinct items of task {task.name!r}, which has "
            f"{task.n_docs}: a partial evaluation"
        )
    per_metric: dict[str, list[float]] = {metric: [] for metric in METRICS}
    loglikelihoods, contexts = [], []
    for doc_id in range(task.n_docs):
        sample = by_doc[doc_id]
        if sample["doc"].get("item", doc_id) != doc_id:
            raise LMEvalError(f"task {task.name!r}: lm-eval's doc {doc_id} is another item")
        for metric in METRICS:
            if metric not in sample:
                raise LMEvalError(f"task {task.name!r}, item {doc_id}: no {metric!r} from lm-eval")
            per_metric[metric].append(float(sample[metric]))
        scores = tuple(float(response[0]) for response in sample["filtered_resps"])
        requests = sample["arguments"]
        if len(scores) != len(requests) or not all(math.isfinite(s) for s in scores):
            raise LMEvalError(f"task {task.name!r}, item {doc_id}: unusable scores {scores}")
        for context, continuation in requests:
            n_tokens = len(tokenizer(context + continuation)["input_ids"])
            if n_tokens > max_length + 1:
                raise LMEvalError(
                    f"task {task.name!r}, item {doc_id}: {n_tokens} tokens, more than the "
                    f"model's {max_length}; lm-eval would have cut the prompt from the left"
                )
        loglikelihoods.append(scores)
        contexts.append(requests[0][0])
    means = {metric: sum(values) / task.n_docs for metric, values in per_metric.items()}
    summary = output.get("results", {}).get(task.name, {})
    for metric, mean in means.items():
        reported = summary.get(f"{metric},none")
        if reported is None or abs(float(reported) - mean) > 1e-9:
            raise LMEvalError(
                f"task {task.name!r}: lm-eval reported {metric}={reported}, but its items "
                f"average {mean}"
            )
    return LMEvalResult(
        acc=means["acc"],
        acc_norm=means["acc_norm"],
        acc_bytes=means["acc_bytes"],
        n=task.n_docs,
        correct=tuple(per_metric["acc"]),
        correct_norm=tuple(per_metric["acc_norm"]),
        correct_bytes=tuple(per_metric["acc_bytes"]),
        loglikelihoods=tuple(loglikelihoods),
        contexts=tuple(contexts),
    )


def _check_task_set(tasks: Sequence[LocalTask]) -> None:
    names = [task.name for task in tasks]
    if not names:
        raise ValueError("no tasks to evaluate")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    n_test = sum(task.n_test for task in tasks)
    if n_test:
        # Same rule as the built-in scorer: test items only inside unlearn.eval.reporting().
        check_not_test([{"split": TEST_SPLIT}] * n_test)


def run_lm_eval(
    model: nn.Module, tokenizer: Any, tasks: Sequence[LocalTask], *, batch_size: int = 16
) -> dict[str, LMEvalResult]:
    """Score local tasks with lm-eval on a model already in memory.

    The model is wrapped in lm-eval's `HFLM` (no copy; its training mode is restored afterwards)
    and evaluated with `lm_eval.simple_evaluate`, zero-shot, without request caching, bootstrap
    or any seeding of global random generators.

    Args:
        model: A Hugging Face causal LM, an nnsight wrapper of one, or a peft model.
        tokenizer: Its tokenizer.
        tasks: Tasks written by `export_items`, `wmdp_bio_robust_task` or `mmlu_task`.
        batch_size: Requests per forward pass.

    Returns:
        Task name to its scores.

    Raises:
        ImportError: lm-eval or accelerate is not installed (the message gives the command).
        ValueError: No tasks, or two with the same name.
        unlearn.eval.ReportOnlyItemsError: Test items outside `unlearn.eval.reporting()`.
        LMEvalError: lm-eval did not score every item, or an item was too long for the model.
    """
    _require("lm_eval", "scoring with lm-eval")
    _require("accelerate", "lm-eval's HFLM")
    _check_task_set(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    module = unwrap(model)
    was_training = module.training
    with offline_datasets():
        try:
            lm = HFLM(
                pretrained=module, tokenizer=tokenizer, batch_size=batch_size, backend="causal"
            )
            manager = TaskManager(
                include_path=sorted({str(task.config.parent) for task in tasks}),
                include_defaults=False,
            )
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task.name for task in tasks],
                task_manager=manager,
                log_samples=True,
                bootstrap_iters=0,
                cache_requests=False,
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
        finally:
            module.train(was_training)
    if output is None:
        raise LMEvalError("lm-eval returned no results")
    return {task.name: _task_result(output, task, tokenizer, lm.max_length) for task in tasks}


def evaluate_items_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    work_dir: str | os.PathLike[str] | None = None,
) -> LMEvalResult:
    """Score items in the library's format with lm-eval (`export_items`, then `run_lm_eval`).

    Args:
        model: A Hugging Face causal LM, an nnsight wrapper of one, or a peft model.
        tokenizer: Its tokenizer.
        items: Mappings with "prompt", "choices" and "answer".
        batch_size: Requests per forward pass.
        work_dir: Where to write the task (default: a temporary directory, removed afterwards).

    Raises:
        ValueError: As `export_items`.
        unlearn.eval.ReportOnlyItemsError: Test items outside `unlearn.eval.reporting()`.
        LMEvalError: As `run_lm_eval`.
    """
    check_not_test(items)
    if work_dir is not None:
        task = export_items(items, work_dir, name="unlearn_items")
        return run_lm_eval(model, tokenizer, [task], batch_size=batch_size)[task.name]
    with tempfile.TemporaryDirectory(prefix="unlearn-lm-eval-") as tmp:
        task = export_items(items, tmp, name="unlearn_items")
        return run_lm_eval(model, tokenizer, [task], batch_size=batch_size)[task.name]


def check_evaluator(evaluator: str) -> None:
    """Check that an evaluator can run before any model loads.

    Raises:
        ValueError: An unknown evaluator.
        ImportError: "lm_eval" without lm-eval or accelerate installed (says how to install).
    """
    if evaluator not in ("builtin", "lm_eval"):
        raise ValueError(f"unknown evaluator {evaluator!r}; choose 'builtin' or 'lm_eval'")
    if evaluator == "lm_eval":
        _require("lm_eval", "--evaluator lm_eval")
        _require("accelerate", "--evaluator lm_eval")


def evaluate_with(
    evaluator: Evaluator, model: nn.Module, tokenizer: Any, items: Sequence[Mapping[str, Any]]
) -> MCResult:
    """Multiple-choice accuracy of `items` by the chosen evaluator, as an `MCResult`.

    "builtin" is `unlearn.eval.evaluate_mc` with its defaults (BOS first, ties share credit);
    "lm_eval" is `evaluate_items_lm_eval` (lm-eval's conventions; see the module docstring).

    Raises:
        ValueError: An unknown evaluator.
    """
    if evaluator == "builtin":
        return evaluate_mc(model, tokenizer, items)
    if evaluator == "lm_eval":
        return evaluate_items_lm_eval(model, tokenizer, items).as_mc_result()
    raise ValueError(f"unknown evaluator {evaluator!r}; choose 'builtin' or 'lm_eval'")
