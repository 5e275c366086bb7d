"""The README's result tables and numbers, generated from the committed benchmarks/results/ files.

Every number the README reports about a measurement sits between two markers naming a block,

    <!-- results:toyworld -->
    ... generated Markdown, ending with "*Generated from benchmarks/results/<file> ...*" ...
    <!-- /results:toyworld -->

and `BLOCKS` says which results file each block is rendered from and how. A block holds only what
its file holds: a row or a sentence with no file behind it cannot appear. Prose outside the blocks
stays qualitative.

    python -m benchmarks.readme            # rewrite every block of README.md in place
    python -m benchmarks.readme --check    # exit 1 and print a diff when README.md is out of date

`render_readme(text, results_dir)` and `readme_diff(text, results_dir)` take the README text and
a results directory, so a test can check a modified copy of either without touching the real files
(tests/benchmarks/test_readme.py).
"""

from __future__ import annotations

import difflib
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from simple_parsing import parse

from benchmarks.leaderboard import FILTERED, UNFILTERED, leaderboard_table
from unlearn.checkpoints import CheckpointScore, select_checkpoint
from unlearn.config import from_dict
from unlearn.provenance import REPO_ROOT
from unlearn.tamper import AttackSettings

RESULTS = REPO_ROOT / "benchmarks" / "results"
"""The committed results directory."""
README = REPO_ROOT / "README.md"
"""The README whose blocks are generated."""
COMMAND = "python -m benchmarks.readme"
"""The command that regenerates the blocks (quoted in every block)."""
WIDTH = 100
"""Column at which generated prose wraps (the README's)."""

_START = re.compile(r"^<!-- results:(?P<name>[a-z_]+) -->$", re.MULTILINE)
_END = "<!-- /results:{name} -->"

METHOD_NOTES = {
    "lens_unlearn": "logit lens, random-target CE",
    "circuit_breakers": "cosine + orthogonality + L2 retain",
    "checkpoint_transfer": "teacher step400 selected, affine maps, KL retain",
    "sequential": "blocks 3→0, max-entropy through the frozen original",
    "probe_unlearn": "probes at blocks 1 and 3, max-entropy, KL retain",
    "rewritten_transfer": "MSE and cross-entropy toward the rewritten twin, KL retain",
}
"""What each method's committed defaults do, in the README's words, in the README's row order."""


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _range(values: list[float], unit: str = "%") -> str:
    """The range of accuracies (fractions) as "a–b%", or "a%" when both ends print the same."""
    low, high = _pct(min(values)), _pct(max(values))
    return f"{low}{unit}" if low == high else f"{low}–{high}{unit}"


def _seconds_range(values: list[float]) -> str:
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return f"{low} s" if low == high else f"{low}–{high} s"


def provenance(payload: dict[str, Any]) -> str:
    """A record's commit, "git <sha7>, dirty tree", from "git_sha" (and "dirty"); "" if none."""
    sha = payload.get("git_sha")
    if not sha:
        return ""
    dirty = sha.endswith("+dirty") or bool(payload.get("dirty"))
    tree = f"git {sha.removesuffix('+dirty')[:7]}, {'dirty' if dirty else 'clean'} tree"
    if "sources" in payload:  # a combined leaderboard (benchmarks.leaderboard_combine)
        runs = dict.fromkeys(
            f"{s['git_sha'][:7]}{', dirty' if s['dirty'] else ''}" for s in payload["sources"]
        )
        return f"git {' and '.join(runs)}, combined at {tree}"
    return tree


def _machine(payload: dict[str, Any]) -> str:
    mach = payload["machine"]
    return f"{mach['cpu_threads']} CPU threads ({mach['platform']}, torch {mach['torch']})"


def toyworld_block(report: dict[str, Any]) -> str:
    """The toy world's accuracy table, from a build's report.json (toyworld_default.json)."""
    unfiltered, filtered = report["unfiltered"], report["filtered"]
    boundary = report["stage1_steps"]
    rows = [
        ("unfiltered, reserved template", unfiltered, ""),
        ("unfiltered, seen template", unfiltered, "_seen"),
        ("filtered twin, reserved template", filtered, ""),
        (f"step {boundary} (stage boundary), reserved", report["checkpoints"][str(boundary)], ""),
    ]
    lines = [
        "| model (4-way cloze accuracy, %) | forget attack | forget held-out (dev+test) | retain |",
        "| --- | --- | --- | --- |",
    ]
    for label, acc, kind in rows:
        lines.append(
            f"| {label} | {_pct(acc[f'forget_attack_acc{kind}'])} | "
            f"{_pct(acc[f'forget_heldout_acc{kind}'])} | {_pct(acc[f'retain_acc{kind}'])} |"
        )
    idle = report.get("idle_build")
    timing = (
        f" A fresh build took {idle['build_seconds']:.0f} s on an idle machine with "
        f"{idle['machine']['cpu_threads']} CPU threads ({provenance(idle)})."
        if idle
        else ""
    )
    note = (
        "Held-out (dev+test): all "
        f"{report['sizes']['forget_heldout_facts']} held-out facts. The held-out pathogens are "
        "split by entity into `forget_dev` (for tuning and selection) and `forget_test` (reported "
        'only): `ToyWorld.heldout_entities()`, `ToyWorld.items("forget_dev" | "forget_test")`. '
        f"Default world, config hash {report['config_hash']}, built by `{report['command']}` on "
        f"{_machine(report)}.{timing} The build is not bit-reproducible across machines: the "
        "file's note says by how much builds of the same config differ."
    )
    return "\n".join(lines) + "\n\n" + note


def checkpoint_curve_block(curve: dict[str, Any]) -> str:
    """Every checkpoint's accuracy on the tuning splits and the one teacher selection picks.

    From `benchmarks.checkpoint_curve`'s file; the selection is `unlearn.checkpoints`' rule (the
    latest checkpoint whose forget accuracy over the attack and dev items is <= chance + 0.05).
    """
    n = curve["n_items"]
    lines = [
        "| checkpoint | forget attack | forget dev | retain |",
        "| --- | --- | --- | --- |",
    ]
    scores = []
    for point in curve["checkpoints"]:
        forget = (
            point["forget_attack_acc"] * n["forget_attack"]
            + point["forget_dev_acc"] * n["forget_dev"]
        ) / (n["forget_attack"] + n["forget_dev"])
        scores.append(CheckpointScore(point["revision"], forget, point["retain_acc"]))
        lines.append(
            f"| {point['revision']} | {_pct(point['forget_attack_acc'])} | "
            f"{_pct(point['forget_dev_acc'])} | {_pct(point['retain_acc'])} |"
        )
    chosen = select_checkpoint(scores)
    note = (
        f"4-way cloze accuracy (%) on the {curve['template']} template: {n['forget_attack']} "
        f"attack, {n['forget_dev']} dev and {n['retain']} retain items; world "
        f"`{curve['world']}`, scored by `{curve['command']}` ({provenance(curve)}). Teacher "
        f"selection (the latest checkpoint with forget accuracy over attack and dev items <= 30%) "
        f"picks **{chosen.revision}**, whose retain accuracy is {_pct(chosen.retain_acc)}%."
    )
    return "\n".join(lines) + "\n\n" + note


def methods_block(record: dict[str, Any]) -> str:
    """The methods table: one row per method that methods_toyworld.json holds."""
    methods = record["methods"]
    order = [m for m in METHOD_NOTES if m in methods] + sorted(set(methods) - set(METHOD_NOTES))

    def before(key: str) -> str:
        values = [row[key] for row in methods.values() if row.get(key) is not None]
        return _range(values) if values else "–"

    lines = [
        "| method | held-out forget (dev+test) | attack forget | retain | wall time |",
        "| --- | --- | --- | --- | --- |",
        f"| unlearned by nothing (unfiltered model) | {before('forget_acc_before')} | "
        f"{before('forget_attack_acc_before')} | {before('retain_acc_before')} | |",
    ]
    for name in order:
        row = methods[name]
        note = ", ".join(n for n in (METHOD_NOTES.get(name), f"{row['num_steps']} steps") if n)
        lines.append(
            f"| `{name}` ({note}) | {_pct(row['forget_heldout_acc'])}% | "
            f"{_pct(row['forget_attack_acc'])}% | {_pct(row['retain_acc'])}% | "
            f"{row['wall_seconds']:.0f} s |"
        )
    by_sha: dict[str, list[str]] = {}
    for name in order:
        sha = provenance({"git_sha": methods[name].get("git_sha", "")}) or "git unknown"
        by_sha.setdefault(sha, []).append(f"`{name}`")
    shas = "; ".join(f"{', '.join(names)} at {sha}" for sha, names in by_sha.items())
    note = (
        f"Measured by `{record['command']}` on {_machine(record)}, each row alone at its own "
        f"commit: {shas}."
    )
    return "\n".join(lines) + "\n\n" + note


def tuned_lens_block(record: dict[str, Any]) -> str:
    """The tuned lens's held-out KL next to the logit lens's (tuned_lens_toyworld.json)."""

    def nats(values: list[float]) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    return (
        f"The tuned lens fitted by `recipes.tuned_lens` ({record['model']}) has held-out KL to "
        f"the final distribution ({record['held_out']}) of {nats(record['tuned'])} nats at blocks "
        f"{' / '.join(str(layer) for layer in record['layers'])}, against "
        f"{nats(record['logit'])} for the logit lens."
    )


def retain_ablation_block(record: dict[str, Any]) -> str:
    """The retain-term ablation's rows (retain_ablation_<method>.json) as a short table."""
    settings = from_dict(AttackSettings, record["settings"])
    attack = f"LoRA r{settings.lora.lora_rank}" if settings.lora.enabled else "full fine-tune"
    lines = [
        "| model | held-out forget | retain | peak under attack | steps to filtered + 10 | "
        "collapsed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        step = row["steps_to_exceed_filtered"]
        lines.append(
            f"| {row['model']} | {_pct(row['forget_acc'])} | {_pct(row['retain_acc'])} | "
            f"{_pct(row['forget_peak'])} | {'held' if step is None else step} | "
            f"{'yes' if row['collapsed'] else 'no'} |"
        )
    note = (
        f"Accuracies in %. Attack: {attack} on attack-split forget text, lr {settings.optim.lr:g} "
        f"{settings.optim.schedule}, {settings.num_steps} steps, seed {settings.seed}."
    )
    return "\n".join(lines) + "\n\n" + note


class _Row(NamedTuple):
    """What the leaderboard summary needs of a row."""

    label: str
    forget: float
    retain: float
    steps: int | None
    collapsed: bool


def _leaderboard_summary(rows: list[_Row], forget_name: str) -> str:
    methods = [r for r in rows if r.label not in (UNFILTERED, FILTERED)]
    collapsed = [f"`{r.label}`" for r in methods if r.collapsed]
    passing = sorted(
        (r for r in methods if r.steps is not None),
        key=lambda r: (r.steps, [m.label for m in methods].index(r.label)),
    )
    held = [f"`{r.label}`" for r in methods if r.steps is None]
    return (
        f"After unlearning, {forget_name} forget is {_range([r.forget for r in methods])} and "
        f"retain {_range([r.retain for r in methods])} across the methods; collapsed: "
        f"{', '.join(collapsed) or 'none'}. First attack step at which forget exceeds the filtered "
        "twin's by 10 points: "
        + (", ".join(f"`{r.label}` {r.steps}" for r in passing) or "none")
        + (f"; never: {', '.join(held)}" if held else "")
        + "."
    )


def leaderboard_block(
    payload: dict[str, Any], details: str = "benchmarks/results/leaderboard.md"
) -> str:
    """The leaderboard table, its column key, wall times and a summary, from leaderboard.json.

    The table is `benchmarks.leaderboard.leaderboard_table`'s; `details` is the Markdown report
    next to the JSON (linked from the key).

    Raises:
        ValueError: A leaderboard.json written before "format": 2 (rerun the leaderboard).
    """
    if payload.get("format") != 2:
        raise ValueError(
            'leaderboard.json predates "format": 2 (one attack, one seed, no test split); rerun '
            "python -m benchmarks.leaderboard"
        )
    key = (
        "Held-out **test** forget and retain accuracy (%) before the attack; the excess of the "
        "worst case over the attack suite above the filtered twin's (attacked the same way), "
        "max and mean over the evaluated steps, in points; the first step at which it exceeds "
        "10 points; the lowest retain under attack; [low, high]: 95% bootstrap intervals over "
        f"items and seeds (details in [`{details}`]({details})):"
    )
    table = leaderboard_table(payload).rstrip("\n")
    times = payload["wall_seconds"].values()
    threads = sorted({s["machine"]["cpu_threads"] for s in payload.get("sources", [payload])})
    wall = (
        f"Wall time on {'–'.join(map(str, threads))} CPU threads, all seeds: unlearning "
        f"{_seconds_range([t['unlearn'] for t in times])} per method, the attack suite "
        f"{_seconds_range([t['attack'] for t in times])} per method."
    )
    rows = [
        _Row(label, m["forget_pre"], m["retain_pre"], m["steps_to_exceed"], m["collapsed"])
        for label, m in payload["rows"].items()
    ]
    forget_name = "test"
    summary = _leaderboard_summary(rows, forget_name)
    return f"{key}\n\n{table}\n\n{wall} {summary}"


def token_selection_block(payload: dict[str, Any]) -> str:
    """Each token selector's mask against the ground-truth value tokens (token_selection.json)."""
    lines = [
        "| selector | fraction selected | precision | recall | F1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in payload["rows"].items():
        lines.append(
            f"| {name} | {row['fraction']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['f1']:.3f} |"
        )
    note = (
        f"{payload['n_documents']} attack-split forget documents ({payload['n_tokens']} tokens) of "
        "the default toy world; each selector with its default settings (chosen on the dev "
        "entities' documents: `python -m benchmarks.token_selection --tune`), scored token by "
        "token against the documents' value tokens; `values` is the ground truth itself and `all "
        "tokens` no selection."
    )
    return "\n".join(lines) + "\n\n" + note


def mask_ablation_block(payload: dict[str, Any]) -> str:
    """One method trained with each forget token mask, attacked (mask_ablation.json)."""
    cfg = payload["config"]
    table = leaderboard_table(payload).rstrip("\n")
    shares = ", ".join(f"`{m}` {100 * s:.1f}%" for m, s in payload["token_share"].items())
    note = (
        f"`{cfg['method']}` trained with each forget token mask (`--token_mask`: `all` every "
        "token, `values` the ground-truth value tokens, otherwise a selector with its default "
        f"settings), {cfg['seeds']} unlearning seeds each, attacked by the `{cfg['suite']}` suite "
        "and read against the filtered twin attacked the same way, as on the leaderboard "
        f"(accuracies in % on {payload['n_test_items']} held-out test items; excess in points; "
        "95% bootstrap intervals over items and seeds). Share of forget tokens each mask "
        f"selects: {shares}."
    )
    return f"{table}\n\n{note}"


def magic_block(payload: dict[str, Any]) -> str:
    """Exact (MAGIC) and first-order attribution: LDS and value-token recovery (magic_*.json)."""
    lines = [
        "| estimate | target | LDS (Spearman) | Pearson | precision at #values | "
        "precision / recall at top 0.2 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    truth = payload["ground_truth"]
    for name in ("magic", "first_order"):
        for target, row in payload["lds"][name].items():
            values, top = truth[f"{name}, top #values"], truth[f"{name}, top 0.2"]
            recovery = (
                f"{values['precision']:.3f} | {top['precision']:.3f} / {top['recall']:.3f}"
                if target == "forget_dev"
                else "– | –"
            )
            lines.append(
                f"| {name.replace('_', '-')} | {target} loss | {row['spearman']:.3f} | "
                f"{row['pearson']:.3f} | {recovery} |"
            )
    lds, magic = payload["lds"], payload["magic"]
    note = (
        f"The attributed run: {payload['n_forget_docs']} attack-split forget and "
        f"{payload['n_retain_docs']} retain documents of the {payload['config']['world_preset']} "
        f"toy world, {magic['num_steps']} SGD steps with momentum; the metagradient through it "
        f"took {magic['seconds']:.0f} s on {payload['machine']['cpu_threads']} CPU thread(s). LDS: "
        f"{lds['n_subsets']} random subsets of {lds['n_dropped']} trained tokens dropped, each "
        "retrained; the correlation between the predicted and the measured change of the target "
        "loss. Precision against the value tokens (base rate "
        f"{truth['values']['fraction']:.3f}) of the forget tokens whose training most lowers the "
        "forget dev loss."
    )
    return "\n".join(lines) + "\n\n" + note


class Block(NamedTuple):
    """One generated block of the README."""

    file: str
    """The results file (under the results directory) it is generated from."""
    render: Callable[[dict[str, Any]], str]
    """The block's Markdown from the file's parsed JSON (without the "Generated from" line)."""


BLOCKS = {
    "toyworld": Block("toyworld_default.json", toyworld_block),
    "mixed_checkpoints": Block("checkpoint_curve_mixed.json", checkpoint_curve_block),
    "methods": Block("methods_toyworld.json", methods_block),
    "tuned_lens": Block("tuned_lens_toyworld.json", tuned_lens_block),
    "retain_ablation": Block("retain_ablation_circuit_breakers.json", retain_ablation_block),
    "leaderboard": Block("leaderboard.json", leaderboard_block),
    "leaderboard_mixed": Block(
        "mixed/leaderboard.json",
        partial(leaderboard_block, details="benchmarks/results/mixed/leaderboard.md"),
    ),
    "token_selection": Block("token_selection.json", token_selection_block),
    "magic": Block("magic_attribution.json", magic_block),
    "mask_ablation": Block("mask_ablation.json", mask_ablation_block),
}
"""Block name (as in the markers) -> its results file and renderer."""


def _wrap(markdown: str) -> str:
    """Prose paragraphs wrapped at the README's 100 columns; tables left as they are."""
    return "\n\n".join(
        paragraph
        if paragraph.startswith("|")
        else textwrap.fill(paragraph, WIDTH, break_long_words=False, break_on_hyphens=False)
        for paragraph in markdown.split("\n\n")
    )


def render_block(name: str, results_dir: Path) -> str:
    """Block `name`'s Markdown between its markers, from its file in `results_dir`."""
    block = BLOCKS[name]
    payload = json.loads((results_dir / block.file).read_text())
    source = f"benchmarks/results/{block.file}"
    measured = provenance(payload)
    return _wrap(
        f"{block.render(payload)}\n\n*Generated from [`{source}`]({source})"
        f"{f' (measured at {measured})' if measured else ''} by `{COMMAND}`.*"
    )


def render_readme(readme: str, results_dir: Path = RESULTS) -> str:
    """`readme` with every generated block rewritten from the files in `results_dir`.

    Raises:
        ValueError: A block of `BLOCKS` is missing from `readme` or appears twice, a marker names
            no block, or a start marker has no end marker.
    """
    names = [m["name"] for m in _START.finditer(readme)]
    unknown = sorted(set(names) - set(BLOCKS))
    missing = sorted(set(BLOCKS) - set(names))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if unknown or missing or repeated:
        raise ValueError(
            f"README blocks do not match benchmarks.readme.BLOCKS: unknown {unknown}, missing "
            f"{missing}, repeated {repeated}"
        )
    for name in BLOCKS:
        start = f"<!-- results:{name} -->"
        end = _END.format(name=name)
        head, found, rest = readme.partition(start + "\n")
        _, found_end, tail = rest.partition(end)
        if not found or not found_end:
            raise ValueError(f"block {name!r}: put {start!r} and {end!r} on lines of their own")
        readme = f"{head}{start}\n{render_block(name, results_dir)}\n{end}{tail}"
    return readme


def readme_diff(readme: str, results_dir: Path = RESULTS, label: str = "README.md") -> str:
    """A unified diff from `readme` to what the files in `results_dir` give ("" when in sync)."""
    expected = render_readme(readme, results_dir)
    return "".join(
        difflib.unified_diff(
            readme.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f"{label} (as it is)",
            tofile=f"{label} (from {results_dir})",
        )
    )


@dataclass
class Config:
    """Regenerate (or check) the README's result blocks from benchmarks/results/."""

    check: bool = False
    """Only compare: exit 1 and print a diff when the README differs from what the files give."""
    readme: str = str(README)
    """The README to rewrite or check."""
    results: str = str(RESULTS)
    """The results directory the blocks are generated from."""


def main(cfg: Config) -> int:
    """Rewrite the README's blocks, or check them; returns the exit status."""
    readme, results = Path(cfg.readme), Path(cfg.results)
    text = readme.read_text()
    try:
        diff = readme_diff(text, results, label=str(readme))
    except (ValueError, OSError, KeyError) as error:
        print(f"error: {error!r}", file=sys.stderr)
        return 2
    if cfg.check:
        if diff:
            print(diff, end="")
            print(f"\n{readme} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{readme} matches {results}")
        return 0
    if diff:
        readme.write_text(render_readme(text, results))
    print(f"{'rewrote' if diff else 'unchanged:'} {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse(Config, args=sys.argv[1:])))
