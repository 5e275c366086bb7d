import pytest
from simple_parsing import parse

from recipes.toyworld import Config, main


@pytest.mark.filterwarnings("error")
def test_main_reuses_the_built_world_and_prints_a_summary(tiny_world, capsys):
    metrics = main(Config(preset="tiny", root=str(tiny_world.root.parent)))
    report = tiny_world.report()
    assert metrics["unfiltered/retain_acc"] == report["unfiltered"]["retain_acc"]
    assert metrics["filtered/forget_heldout_acc"] == report["filtered"]["forget_heldout_acc"]
    assert metrics["build_seconds"] == report["build_seconds"]
    out = capsys.readouterr().out
    assert "unfiltered (reserved)" in out and "filtered (seen)" in out and "stage boundary" in out


def test_cli_parses_and_rejects_unknown_presets():
    cfg = parse(Config, args=["--preset", "tiny", "--seed", "3"])
    assert cfg == Config(preset="tiny", seed=3)
    with pytest.raises(SystemExit):
        parse(Config, args=["--preset", "huge"])
