"""lm-eval (EleutherAI's LM Evaluation Harness, 0.4.x) tasks on local files, and their prompts.

- **Local tasks.** `export_items` writes any items in the library's format ("prompt", "choices",
  "answer"; the toy world's, or `unlearn.data.read_items`') as an lm-eval task: a YAML config and
  a JSON-lines data file in a directory. `wmdp_bio_robust_task` and `mmlu_task` write the task
  definitions of WMDP-Bio (robust multiple choice) and MMLU over a local data file with the real
  data sets' fields (WMDP: question, choices, answer; MMLU: question, subject, choices, answer),
  in JSON lines or Parquet. Every task is zero-shot by construction: it has no few-shot split.
  Nothing is downloaded: the data files are local, the `json`/`parquet` builders ship with
  `datasets`, and `offline_datasets` keeps `datasets` and the hub client offline while tasks are
  read (`datasets` would otherwise send a request even for a local file). The `datasets` cache of
  a task lives inside its directory.
- **Prompts.** `wmdp_prompt` and `mmlu_prompt` render lm-eval's zero-shot context of a row, and
  `benchmark_items` turns rows into library items with that prompt and the choices " A".." D",
  so the built-in scorer (`unlearn.eval`) can score the same questions.

Scoring the tasks on a model in memory is `unlearn.lm_eval_scoring`, which also lists where
lm-eval's conventions and the built-in scorer's differ. Exported items are scored as (prompt,
choice) exactly (``target_delimiter: ""``: the library's choices carry their own separating space);
WMDP and MMLU use lm-eval's " " delimiter and choices "A".."D", the same strings as the built-in
items' " A".." D".

Usage:
    >>> task = export_items(world.items("retain"), "/tmp/tasks", name="toyworld_retain")
    >>> wmdp = wmdp_bio_robust_task("wmdp_bio_robust.jsonl", "/tmp/tasks")
    >>> items = benchmark_items(rows, "mmlu")   # for unlearn.eval.evaluate_mc
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unlearn.eval import TEST_SPLIT
from unlearn.keys import content_key

METRICS = ("acc", "acc_norm", "acc_bytes")
"""The per-item metrics every task here asks lm-eval for."""

ANSWER_LETTERS = ("A", "B", "C", "D")
"""WMDP and MMLU choices as lm-eval scores them."""

WMDP_BIO_DESCRIPTION = (
    "The following are multiple choice questions (with answers) about biology.\n\n"
)
"""lm-eval's WMDP-Bio description (tasks/wmdp/wmdp_bio.yaml)."""

MMLU_DESCRIPTION = (
    "The following are multiple choice questions (with answers) about "
    "{{subject.replace('_', ' ')}}.\n\n"
)
"""lm-eval's MMLU description, one subject per doc (its per-subject YAMLs write it out)."""

QUESTION_TEMPLATE = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:"
)
"""lm-eval's WMDP and MMLU `doc_to_text` (tasks/wmdp/_default_template_yaml, tasks/mmlu/default)."""

BENCHMARK_FIELDS: dict[str, tuple[str, ...]] = {
    "wmdp_bio_robust": ("question", "choices", "answer"),
    "mmlu": ("question", "subject", "choices", "answer"),
}
"""Fields each benchmark's rows must have (those of cais/wmdp and cais/mmlu)."""

DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Local data file suffix to the `datasets` builder that reads it."""

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables set to 1 while tasks are read or run (`offline_datasets`)."""


@dataclass(frozen=True)
class LocalTask:
    """An lm-eval task written to disk: its YAML and data file."""

    name: str
    """The task name (unique among the tasks of one run)."""
    config: Path
    """The YAML task config; its directory goes on lm-eval's include path."""
    data: Path
    """The local data file the config reads."""
    n_docs: int
    """Number of docs (items) in the data file."""
    n_test: int = 0
    """How many docs are test items (split "forget_test"), scored only inside `reporting()`."""


@contextmanager
def offline_datasets() -> Iterator[None]:
    """`datasets` and the hub client offline for the duration (every file read here is local).

    `datasets` reads ``HF_DATASETS_OFFLINE`` once, when it is imported, and otherwise sends a
    download-count request to the network even to load a local JSON file; setting the variable
    later changes nothing. This sets the flags it (and `huggingface_hub`) read at call time, and
    the variables, and restores all of them afterwards.
    """
    import datasets.config
    from huggingface_hub import constants

    flags = [
        (datasets.config, "HF_HUB_OFFLINE", True),
        (datasets.config, "HF_DATASETS_OFFLINE", True),
        (datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False),
        (constants, "HF_HUB_OFFLINE", True),
    ]
    saved_flags = [(module, name, getattr(module, name)) for module, name, _ in flags]
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    for module, name, value in flags:
        setattr(module, name, value)
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    try:
        yield
    finally:
        for module, name, value in saved_flags:
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _yaml_text(config: Mapping[str, Any]) -> str:
    """A task config as YAML: JSON is YAML, and JSON escapes keep descriptions' newlines exact."""
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())


def _cache_dir(out_dir: Path, data: Path) -> Path:
    """The `datasets` cache of one data file's task: in `out_dir`, keyed by the file's content.

    `datasets` tells a rewritten file from the old one by its modification time, which two quick
    rewrites can share; a folder per content cannot serve stale rows.
    """
    return (out_dir / ".datasets_cache" / content_key(data)).resolve()


def _write_task(
    name: str, data: Path, out_dir: Path, fields: Mapping[str, Any], n_docs: int, n_test: int = 0
) -> LocalTask:
    """Write `<out_dir>/<name>.yaml` reading `data` with the builder its suffix names."""
    builder = DATA_BUILDERS.get(data.suffix.lower())
    if builder is None:
        raise ValueError(f"cannot read {data}: use one of {sorted(DATA_BUILDERS)}")
    config = {
        "task": name,
        "dataset_path": builder,
        "dataset_kwargs": {
            "data_files": {"test": str(data.resolve())},
            "cache_dir": str(_cache_dir(out_dir, data)),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "num_fewshot": 0,
        **fields,
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS
        ],
        "metadata": {"version": 1.0},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(_yaml_text(config), encoding="utf-8")
    return LocalTask(name=name, config=path, data=data, n_docs=n_docs, n_test=n_test)


def _check_items(items: Sequence[Mapping[str, Any]]) -> None:
    if len(items) == 0:
        raise ValueError("cannot export an empty item set; check the split name and the data path")
    for index, item in enumerate(items):
        choices, answer = item.get("choices"), item.get("answer")
        if not isinstance(item.get("prompt"), str) or not isinstance(choices, (list, tuple)):
            raise ValueError(f"item {index} needs a string 'prompt' and a list 'choices': {item}")
        is_index = isinstance(answer, numbers.Integral) and not isinstance(answer, bool)
        if not is_index or not 0 <= int(answer) < len(choices):
            raise ValueError(f"item {index} has answer {answer!r} outside [0, {len(choices)})")


def export_items(
    items: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str], name: str = "items"
) -> LocalTask:
    """Write items in the library's format as a local lm-eval task.

    The data file `<name>.jsonl` keeps, per item, "prompt", "choices", "answer", its index "item"
    and its "split" if it has one. The task scores (prompt, choice) exactly
    (``target_delimiter: ""``: choices carry their own separating space).

    Args:
        items: Mappings with "prompt", "choices" and "answer" (index), e.g. toy-world items.
        out_dir: Directory for `<name>.yaml` and `<name>.jsonl` (created if missing).
        name: The task name.

    Raises:
        ValueError: No items, or an item without a prompt, choices or an answer in range.
    """
    _check_items(items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for index, item in enumerate(items):
            row = {
                "item": index,
                "prompt": item["prompt"],
                "choices": list(item["choices"]),
                "answer": int(item["answer"]),
                **({"split": item["split"]} if "split" in item else {}),
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    fields = {
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": "",
    }
    n_test = sum(1 for item in items if item.get("split") == TEST_SPLIT)
    return _write_task(name, data, out, fields, len(items), n_test)


def _read_rows(path: Path, out_dir: Path) -> list[dict[str, Any]]:
    """Rows of a local JSON-lines, JSON or Parquet file, through the builder lm-eval will use."""
    import datasets

    builder = DATA_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"cannot read {path}: use one of {sorted(DATA_BUILDERS)}")
    with offline_datasets():
        rows = datasets.load_dataset(
            builder,
            data_files={"test": str(path)},
            split="test",
            cache_dir=str(_cache_dir(out_dir, path)),
        )
    return [dict(row) for row in rows]


def _check_benchmark_rows(rows: Sequence[Mapping[str, Any]], kind: str, path: Path) -> None:
    if not rows:
        raise ValueError(f"{path} holds no rows")
    for index, row in enumerate(rows):
        missing = [f for f in BENCHMARK_FIELDS[kind] if f not in row]
        if missing:
            raise ValueError(
                f"row {index} of {path} lacks {missing} (a {kind} row has "
                f"{list(BENCHMARK_FIELDS[kind])})"
            )
        if len(row["choices"]) != len(ANSWER_LETTERS) or not 0 <= int(row["answer"]) < 4:
            raise ValueError(f"row {index} of {path} needs 4 choices and an answer in 0..3")


def _benchmark_task(
    kind: Literal["wmdp_bio_robust", "mmlu"],
    data_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    name: str,
) -> LocalTask:
    data = Path(data_file).expanduser().resolve()
    if not data.is_file():
        raise FileNotFoundError(f"no {kind} data file at {data}")
    rows = _read_rows(data, Path(out_dir))
    _check_benchmark_rows(rows, kind, data)
    fields = {
        "description": WMDP_BIO_DESCRIPTION if kind == "wmdp_bio_robust" else MMLU_DESCRIPTION,
        "doc_to_text": QUESTION_TEMPLATE,
        "doc_to_choice": list(ANSWER_LETTERS),
        "doc_to_target": "answer",
        "target_delimiter": " ",
    }
    return _write_task(name, data, Path(out_dir), fields, len(rows))


def wmdp_bio_robust_task(
    data_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    name: str = "wmdp_bio_robust",
) -> LocalTask:
    """Write the zero-shot WMDP-Bio (robust) multiple-choice task over a local data file.

    lm-eval's `wmdp_bio` definition (description, question template, choices "A".."D", acc),
    reading rows with the fields of cais/wmdp: "question", "choices" (4 strings), "answer" (0..3).
    The robust subset is a choice of rows, so the same definition serves it.

    Args:
        data_file: A ".jsonl", ".json" or ".parquet" file of rows.
        out_dir: Directory for `<name>.yaml`.
        name: The task name.

    Raises:
        FileNotFoundError: No data file.
        ValueError: A row without those fields, 4 choices and an answer in 0..3.
    """
    return _benchmark_task("wmdp_bio_robust", data_file, out_dir, name)


def mmlu_task(
    data_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    name: str = "mmlu",
) -> LocalTask:
    """Write the zero-shot MMLU task over a local data file of any subjects.

    lm-eval's MMLU definition (tasks/mmlu/default) in one task: each row's description names its
    own "subject" (underscores as spaces), as lm-eval's per-subject tasks do; the mean over rows is
    lm-eval's size-weighted `mmlu` group score. Rows have cais/mmlu's fields: "question",
    "subject", "choices" (4 strings), "answer" (0..3).

    Args:
        data_file: A ".jsonl", ".json" or ".parquet" file of rows.
        out_dir: Directory for `<name>.yaml`.
        name: The task name.

    Raises:
        FileNotFoundError: No data file.
        ValueError: A row without those fields, 4 choices and an answer in 0..3.
    """
    return _benchmark_task("mmlu", data_file, out_dir, name)


def _question_text(row: Mapping[str, Any]) -> str:
    """`QUESTION_TEMPLATE` rendered in Python."""
    lettered = zip(ANSWER_LETTERS, row["choices"], strict=True)
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in lettered)
    return f"{row['question'].strip()}{choices}\nAnswer:"


def wmdp_prompt(row: Mapping[str, Any]) -> str:
    """lm-eval's zero-shot WMDP-Bio context of a row (description, question, lettered choices)."""
    return WMDP_BIO_DESCRIPTION + _question_text(row)


def mmlu_prompt(row: Mapping[str, Any]) -> str:
    """lm-eval's zero-shot MMLU context of a row (its subject's description, question, choices)."""
    subject = str(row["subject"]).replace("_", " ")
    description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return description + _question_text(row)


PROMPTS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "wmdp_bio_robust": wmdp_prompt,
    "mmlu": mmlu_prompt,
}
"""Each benchmark's zero-shot context."""


def benchmark_items(
    rows: Sequence[Mapping[str, Any]], kind: Literal["wmdp_bio_robust", "mmlu"]
) -> list[dict[str, Any]]:
    """Benchmark rows as library items: lm-eval's context as "prompt", " A".." D" as choices.

    The built-in scorer (`unlearn.eval.evaluate_mc`) then scores the same strings lm-eval does.
    """
    render = PROMPTS[kind]
    return [
        {
            "prompt": render(row),
            "choices": [f" {letter}" for letter in ANSWER_LETTERS],
            "answer": int(row["answer"]),
        }
        for row in rows
    ]
