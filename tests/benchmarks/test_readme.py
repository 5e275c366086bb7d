"""README.md's generated result blocks agree with benchmarks/results/ (`benchmarks.readme`).

The first test is the guard: it fails whenever the README and the committed files disagree. The
others show that it can fail (a number changed in a copy of the README, or in a copy of a results
file) and pin down how each block is rendered, without touching the real files.
"""

import json
import re
import shutil

import pytest

from benchmarks.leaderboard import FILTERED, UNFILTERED, leaderboard_table
from benchmarks.readme import (
    BLOCKS,
    COMMAND,
    METHOD_NOTES,
    README,
    RESULTS,
    Config,
    leaderboard_block,
    main,
    readme_diff,
    render_block,
    render_readme,
)

README_TEXT = README.read_text()
TOYWORLD_ROW = "| unfiltered, reserved template |"


def block_text(readme: str, name: str) -> str:
    return readme.split(f"<!-- results:{name} -->\n")[1].split(f"<!-- /results:{name} -->")[0]


def with_changed_number(readme: str) -> tuple[str, str, str]:
    """The README with the first number of the toy-world table's first row changed to 12.3."""
    line = next(line for line in readme.splitlines() if line.startswith(TOYWORLD_ROW))
    changed = re.sub(r"\d+\.\d", "12.3", line, count=1)
    assert changed != line
    return readme.replace(line, changed, 1), line, changed


@pytest.fixture
def results_copy(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.md"))
    return results


def test_readme_matches_the_result_files():
    diff = readme_diff(README_TEXT, RESULTS)
    assert diff == "", f"README.md is out of date: run `{COMMAND}`\n{diff}"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_says_which_file_it_is_generated_from(name):
    text = " ".join(block_text(README_TEXT, name).split())
    source = f"benchmarks/results/{BLOCKS[name].file}"
    assert f"*Generated from [`{source}`]({source})" in text
    assert f"by `{COMMAND}`.*" in text


def test_a_number_changed_in_the_readme_fails_the_check(tmp_path, capsys):
    edited, line, changed = with_changed_number(README_TEXT)
    path = tmp_path / "README.md"
    path.write_text(edited)

    assert main(Config(check=True, readme=str(path))) == 1
    out = capsys.readouterr().out
    assert f"-{changed}\n" in out and f"+{line}\n" in out
    assert path.read_text() == edited  # --check never writes


def test_a_number_changed_in_a_results_file_fails_the_check(results_copy, tmp_path, capsys):
    path = results_copy / "toyworld_default.json"
    report = json.loads(path.read_text())
    report["unfiltered"]["forget_heldout_acc"] = 0.5
    path.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)

    diff = readme_diff(README_TEXT, results_copy)
    assert re.search(r"^\+\| unfiltered, reserved template \| [\d.]+ \| 50\.0 \|", diff, re.M)
    assert main(Config(check=True, readme=str(readme), results=str(results_copy))) == 1
    assert "50.0" in capsys.readouterr().out


def test_the_unchanged_files_pass_the_check(results_copy, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    assert main(Config(check=True, readme=str(readme), results=str(results_copy))) == 0


def test_regenerating_restores_the_blocks(tmp_path):
    edited, _, _ = with_changed_number(README_TEXT)
    path = tmp_path / "README.md"
    path.write_text(edited)

    assert main(Config(readme=str(path))) == 0
    assert path.read_text() == README_TEXT
    assert render_readme(README_TEXT) == README_TEXT


def test_a_missing_or_unknown_block_is_an_error(tmp_path):
    missing = README_TEXT.replace("<!-- results:tuned_lens -->\n", "")
    with pytest.raises(ValueError, match=r"missing \['tuned_lens'\]"):
        render_readme(missing)
    unknown = README_TEXT + "\n<!-- results:probe -->\n<!-- /results:probe -->\n"
    with pytest.raises(ValueError, match=r"unknown \['probe'\]"):
        render_readme(unknown)
    path = tmp_path / "README.md"
    path.write_text(missing)
    assert main(Config(check=True, readme=str(path))) == 2


def test_the_methods_table_has_exactly_the_rows_the_file_holds(results_copy):
    methods = json.loads((RESULTS / "methods_toyworld.json").read_text())["methods"]
    block = block_text(README_TEXT, "methods")
    for name in {*METHOD_NOTES, *methods}:
        assert (f"| `{name}` (" in block) == (name in methods), name

    path = results_copy / "methods_toyworld.json"
    record = json.loads(path.read_text())
    del record["methods"]["circuit_breakers"]
    path.write_text(json.dumps(record))
    assert "circuit_breakers" not in render_block("methods", results_copy)


def format_2_metrics(forget, steps, collapsed=False):
    metrics = {
        "forget_pre": forget,
        "retain_pre": 0.95,
        "excess_max": 0.2,
        "excess_mean": 0.1,
        "steps_to_exceed": steps,
        "retain_under_attack": 0.9,
        "collapsed": collapsed,
    }
    with_ci = ("forget_pre", "retain_pre", "excess_max", "excess_mean", "steps_to_exceed")
    return metrics | {f"{k}_ci": [metrics[k], metrics[k]] for k in with_ci}


def test_a_format_2_leaderboard_renders_with_leaderboard_table(results_copy):
    payload = {
        "format": 2,
        "git_sha": "0123456789abcdef",
        "dirty": True,
        "machine": {"cpu_threads": 2},
        "wall_seconds": {"lens_unlearn": {"unlearn": 200.0, "attack": 500.0}},
        "rows": {
            UNFILTERED: format_2_metrics(0.95, 0),
            FILTERED: format_2_metrics(0.25, None),
            "lens_unlearn": format_2_metrics(0.3, 50, collapsed=True),
        },
    }
    block = leaderboard_block(payload)
    assert leaderboard_table(payload).rstrip("\n") in block
    assert "collapsed: `lens_unlearn`" in block and "`lens_unlearn` 50" in block

    (results_copy / "leaderboard.json").write_text(json.dumps(payload))
    text = " ".join(render_block("leaderboard", results_copy).split())
    assert "(measured at git 0123456, dirty tree)" in text
    assert "[`benchmarks/results/leaderboard.md`](benchmarks/results/leaderboard.md)" in text

    (results_copy / "mixed" / "leaderboard.json").write_text(json.dumps(payload))
    mixed = " ".join(render_block("leaderboard_mixed", results_copy).split())
    details = "benchmarks/results/mixed/leaderboard.md"
    assert f"[`{details}`]({details})" in mixed
    assert "benchmarks/results/leaderboard.md" not in mixed


def test_a_leaderboard_file_before_format_2_is_refused():
    with pytest.raises(ValueError, match="rerun python -m benchmarks.leaderboard"):
        leaderboard_block({"rows": []})


def test_the_checkpoint_block_picks_the_latest_checkpoint_near_chance():
    """By hand on a made-up curve: forget over attack and dev items weighted by their counts
    (step200: (0.28 * 3 + 0.40 * 1) / 4 = 0.31 > 0.30, step100: (0.30 * 3 + 0.26) / 4 = 0.29), so
    step100 is picked, with its retain accuracy."""
    from benchmarks.readme import checkpoint_curve_block

    curve = {
        "template": "reserved",
        "n_items": {"forget_attack": 3, "forget_dev": 1, "retain": 5},
        "world": "w",
        "command": "c",
        "git_sha": "a" * 40,
        "checkpoints": [
            {
                "revision": "step0",
                "forget_attack_acc": 0.25,
                "forget_dev_acc": 0.25,
                "retain_acc": 0.2,
            },
            {
                "revision": "step100",
                "forget_attack_acc": 0.30,
                "forget_dev_acc": 0.26,
                "retain_acc": 0.6,
            },
            {
                "revision": "step200",
                "forget_attack_acc": 0.28,
                "forget_dev_acc": 0.40,
                "retain_acc": 0.9,
            },
        ],
    }
    block = checkpoint_curve_block(curve)
    assert "picks **step100**, whose retain accuracy is 60.0%" in block
    assert "| step200 | 28.0 | 40.0 | 90.0 |" in block
