"""Orthogonal circuit breakers: reroute forget activations and make them mutually orthogonal.

Loads the toy world's unfiltered model (building the world on first use), evaluates it, unlearns
with the circuit-breaker cosine term, the within-batch orthogonality term and an L2 retain term
(`unlearn.methods.circuit_breakers`), evaluates again and writes run_info.json, metrics.jsonl,
training.png, model/ and results.json to --out. `--orth_coef 0` gives plain circuit breakers.

Commands:
    python -m recipes.circuit_breakers --out runs/circuit_breakers
    python -m recipes.circuit_breakers --out runs/cb_plain --orth_coef 0
    python -m recipes.circuit_breakers --out /tmp/smoke --world_preset tiny --num_steps 2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from unlearn.experiment import DataConfig, ModelConfig, TrainingConfig, run_unlearning, start_run
from unlearn.methods import CircuitBreakers, CircuitBreakersConfig
from unlearn.runs import run_recipe


@dataclass
class Config:
    """Orthogonal circuit breakers on the toy world (or any causal LM)."""

    out: str = "runs/circuit_breakers"
    """Output directory (rerun the same command to resume)."""
    overwrite: bool = False
    """Delete what --out holds and start over (a rerun without it resumes the same run and refuses
    any other: another recipe, config, model, data or code version)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(num_steps=300, lr=9e-3))
    method: CircuitBreakersConfig = field(default_factory=CircuitBreakersConfig)


def main(cfg: Config) -> dict[str, float]:
    """Unlearn and return results.json's numbers."""
    run_key = start_run(
        cfg.out,
        "circuit_breakers",
        cfg,
        cfg.model,
        cfg.data,
        overwrite=cfg.overwrite,
        train_cfg=cfg.training,
    )
    results = run_unlearning(
        lambda n_layers: CircuitBreakers(cfg.method, n_layers),
        cfg.model,
        cfg.data,
        cfg.training,
        cfg.out,
        asdict(cfg),
        name="circuit_breakers",
        run_key=run_key,
    )
    print(
        f"held-out forget {results['forget_acc_before']:.3f} -> {results['forget_acc']:.3f}, "
        f"retain {results['retain_acc_before']:.3f} -> {results['retain_acc']:.3f}; {cfg.out}"
    )
    return results


if __name__ == "__main__":
    run_recipe(main, Config)
