"""The generic recipe and the registry: one registration makes a method runnable everywhere."""

import json
from dataclasses import dataclass

import pytest

from interventions import Read
from unlearn.config import DataConfig, TrainingConfig
from unlearn.losses import next_token_nll_loss
from unlearn.methods import FORGET, TRAINABLE, Phase, Plan, Registration, Term
from unlearn.methods.retain import retain_component


@dataclass
class ToyAscentConfig:
    """Gradient ascent on forget text with a KL retain term."""

    forget_coef: float = 1.0
    """Forget coefficient."""
    retain_coef: float = 1.0
    """Retain coefficient."""


class ToyAscent:
    """Nodes and terms: minus the next-token NLL of forget text, plus retain."""

    def __init__(self, cfg: ToyAscentConfig) -> None:
        def ascent(acts, forget, retain):
            labels = forget.input_ids[:, 1:]
            return -next_token_nll_loss(
                acts["forget_logits"][:, :-1], labels, forget.token_mask[:, 1:]
            )

        retain_part = retain_component("kl", "all", cfg.retain_coef)
        self.nodes = (
            Read("forget_logits", "unembed", model=TRAINABLE, batch=FORGET),
            *retain_part.nodes,
        )
        self.terms = (Term("forget", ascent, cfg.forget_coef), *retain_part.terms)


TOY = Registration(
    name="toy_ascent",
    config=ToyAscentConfig,
    build=lambda cfg, ctx: Plan([Phase(ToyAscent(cfg), ctx.training.num_steps)], {"built": 1}),
    summary="Toy gradient ascent (test only).",
    data=lambda: DataConfig(batch_size=4),
    training=lambda: TrainingConfig(num_steps=2, eval_every=0),
)


@pytest.fixture
def toy_registered(monkeypatch):
    """`TOY` registered for one test (removed from the registry afterwards)."""
    from unlearn.methods import REGISTRY

    monkeypatch.setitem(REGISTRY, TOY.name, TOY)
    return TOY


def test_one_registration_puts_a_method_in_every_list(toy_registered):
    from benchmarks import leaderboard, methods_toyworld, tune_dev
    from recipes import retain_ablation

    assert "toy_ascent" in leaderboard.Config().methods
    assert retain_ablation.Config(method="toy_ascent").method == "toy_ascent"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        retain_ablation.Config(method="nope")
    assert "toy_ascent" in tune_dev.Config(methods=["toy_ascent"]).methods
    assert "toy_ascent" in methods_toyworld.REGISTRY


def test_the_generic_recipe_runs_a_newly_registered_method(toy_registered, tiny_home, tmp_path):
    from recipes import unlearn as generic

    out = tmp_path / "toy"
    generic.main(["--method", "toy_ascent", "--world_preset", "tiny", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["num_steps"] == 2 and results["num_phases"] == 1
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["built"] == 1 and info["config"]["method"] == {
        "forget_coef": 1.0,
        "retain_coef": 1.0,
    }
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss/forget" in r] == [1, 2]


def test_method_help_lists_the_methods_settings(capsys):
    from recipes import unlearn as generic

    with pytest.raises(SystemExit) as exit_info:
        generic.main(["--method", "sequential", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--maintain_unlearned" in help_text and "--lr" in help_text
    assert "(default: 0.002)" in help_text or "default: 0.002" in help_text


def test_without_a_method_the_recipe_lists_every_registered_one(capsys):
    from recipes import unlearn as generic
    from unlearn.methods import REGISTRY

    with pytest.raises(SystemExit) as exit_info:
        generic.main([])
    assert exit_info.value.code == 2
    listing = capsys.readouterr().out
    assert all(name in listing for name in REGISTRY)
