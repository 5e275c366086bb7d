"""How a method becomes training: a registration, the context its preparation reads, and a plan.

A method is registered once (`register`) as its config dataclass plus `build(cfg, context) ->
Plan`. `build` prepares what the method needs from the `Context` (the loaded model and tokenizer,
the data and tuning items, the device, the output directory): checkpoint transfer selects its
teacher and fits maps there, rewritten transfer computes its targets, sequential unlearning copies
the original model. The `Plan` is one or more `Phase`s, each a method declaration (step-graph
nodes and weighted terms, `unlearn.methods.base`), a number of steps, which blocks (and which
of their parameters) train and, optionally, the weights it starts from (`Phase.init`); the one
training core runs them in order (`unlearn.experiment.run_method`). A method never imports the
training core.

Registering a method adds it to the generic recipe (`python -m recipes.unlearn --method <name>`),
the retain ablation, the leaderboard and the methods benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from unlearn.checkpoints import TeacherChoice, choose_teacher
from unlearn.config import DataConfig, ModelConfig, TrainingConfig
from unlearn.methods.base import Method
from unlearn.toyworld.world import DEV, ToyWorld


@dataclass
class Context:
    """What a method's `build` may read to prepare (never test items)."""

    model: nn.Module
    """The model to unlearn (fp32 Hugging Face causal LM, as loaded: the original)."""
    tokenizer: Any
    """Its tokenizer."""
    source: str
    """Where the model was loaded from (a checkpointed teacher's default)."""
    forget_docs: list[dict[str, Any]]
    """Forget documents the method trains on (the toy world's attack split)."""
    retain_docs: list[dict[str, Any]]
    """Retain documents."""
    items: dict[str, dict[str, list[dict[str, Any]]]]
    """Tuning items: template kind -> split (forget_attack, forget_dev, retain) -> items."""
    data: DataConfig
    """Data settings (row length and batch size of the run)."""
    training: TrainingConfig
    """Training settings (steps and seed of the run)."""
    device: str
    """Device of the model."""
    out_dir: Path
    """The run's output directory (preparations write their reports here)."""
    world: ToyWorld | None = None
    """The toy world the data came from (None for user-supplied data)."""

    @property
    def n_layers(self) -> int:
        """Blocks of the model."""
        return int(self.model.config.num_hidden_layers)

    def tuning_items(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(forget items a choice may read: attack split + dev, retain items), headline kind."""
        kind = "items" if "items" in self.items else self.data.eval_template
        splits = self.items[kind]
        return [*splits.get("forget_attack", []), *splits[DEV]], splits["retain"]

    def choose_teacher(self, cfg: Any, *, score_retain: bool) -> tuple[TeacherChoice, dict]:
        """The teacher checkpoint of a checkpoint-based method, and what to record about it.

        `cfg` has the teacher settings of checkpoint transfer and probe unlearning (teacher,
        teacher_revision, teacher_revisions, chance, margin); without a revision, the tuning
        items decide (`unlearn.checkpoints.choose_teacher`; sweep in out_dir/teacher_sweep).

        Args:
            cfg: The method's settings.
            score_retain: Score retain items in the sweep too (reported, never deciding).

        Returns:
            The choice, and {"selected_teacher", "teacher_forget_acc" when swept} for `Plan.info`.
        """
        forget, retain = self.tuning_items() if cfg.teacher_revision is None else ([], [])
        teacher = choose_teacher(
            cfg.teacher or self.source,
            cfg.teacher_revision,
            cfg.teacher_revisions,
            forget,
            retain if score_retain else None,
            self.out_dir / "teacher_sweep",
            chance=cfg.chance,
            margin=cfg.margin,
            device=self.device,
        )
        info: dict[str, Any] = {"selected_teacher": teacher.revision}
        if teacher.score is not None:
            info["teacher_forget_acc"] = teacher.score.forget_acc
            retain_acc = teacher.score.retain_acc
            print(
                f"teacher: {teacher.revision} (forget {teacher.score.forget_acc:.3f}"
                + (f", retain {retain_acc:.3f})" if retain_acc is not None else ")")
            )
        return teacher, info


@dataclass(frozen=True)
class Phase:
    """One stretch of training with one method declaration."""

    method: Method
    """Nodes and weighted terms (`unlearn.methods.base`)."""
    num_steps: int
    """Optimizer steps."""
    name: str = ""
    """Sub-directory of the run's output holding this phase's state ("": the run's own)."""
    blocks: tuple[int, ...] | None = None
    """Blocks whose weights train (LoRA: whose linear layers get adapters); None: every weight
    (every block's, when `parameters` is set)."""
    parameters: tuple[str, ...] | None = None
    """Only these parameters of each training block train: glob patterns of names relative to the
    block (`fnmatch`, `*` crosses dots), e.g. ("mlp.*",); LoRA puts adapters only on the linear
    layers whose weight matches. None: every parameter of the blocks."""
    seed_offset: int = 0
    """The phase trains with the run's seed plus this (random targets differ between phases)."""
    init: Callable[[nn.Module], None] | None = None
    """Sets the weights the phase starts from, in place: the training core calls it on the model
    (under `torch.no_grad`) before the phase trains, so before the frozen "base" copy is taken
    (UNDO's noised copy of its teacher, rewind-and-distill's early checkpoint). It must be
    deterministic: a resumed run calls it again before loading the saved state. None: the phase
    starts from the model as the earlier phases left it."""


@dataclass
class Plan:
    """What `build` returns: the phases, and what preparation chose (recorded with the run)."""

    phases: list[Phase]
    info: dict[str, Any] = field(default_factory=dict)
    """Choices and measurements of the preparation (e.g. the selected teacher), JSON-ready."""


def no_inputs(
    cfg: Any, model_cfg: ModelConfig, data_cfg: DataConfig
) -> dict[str, dict[str, str | None]]:
    """A method that reads no input beyond the model and data."""
    return {}


@dataclass(frozen=True)
class Registration:
    """A method, as the generic recipe and the benchmarks see it."""

    name: str
    """Its name (`--method`, run keys, leaderboard rows)."""
    config: type
    """Its settings dataclass (flags of the generic recipe)."""
    build: Callable[[Any, Context], Plan]
    """Prepare and return the plan."""
    summary: str
    """One line for `--help` and listings."""
    defaults: Callable[[], Any] | None = None
    """Its default settings, where they differ from the config class's (None: `config()`)."""
    data: Callable[[], DataConfig] = DataConfig
    """Its default data settings."""
    training: Callable[[], TrainingConfig] = TrainingConfig
    """Its default training settings."""
    inputs: Callable[[Any, ModelConfig, DataConfig], dict[str, dict[str, str | None]]] = no_inputs
    """Checks the settings against the model and data settings before anything loads (raising
    ValueError) and names the further inputs the run is keyed by: `check_inputs`' documents,
    paths and models (`unlearn.experiment`)."""

    tuned: bool = True
    """Whether its committed defaults were chosen on the dev split (`benchmarks.tune_dev`, whose
    committed sweep a test checks). An untuned method runs with placeholder defaults, says so when
    it runs, and is left out of the benchmarks' default method lists until its sweep is
    committed."""

    standalone: bool = True
    """Whether it runs from its registered defaults and the model and data alone. False: it
    needs an input no default can give (UNDO's unlearned teacher, `--teacher`), so the
    benchmarks' default method lists (`benchmark_methods`) leave it out; name it with its input
    flags to run it."""

    def default_config(self) -> Any:
        """The method's default settings."""
        return self.defaults() if self.defaults is not None else self.config()


REGISTRY: dict[str, Registration] = {}
"""Every registered method by name."""


def register(registration: Registration) -> Registration:
    """Add a method to `REGISTRY` (raises ValueError on a taken or malformed name)."""
    name = registration.name
    if not (name.isidentifier() and name == name.lower()):
        raise ValueError(f"method name {name!r} must be a lowercase identifier")
    if name in REGISTRY and REGISTRY[name] is not registration:
        raise ValueError(f"a method named {name!r} is already registered")
    REGISTRY[name] = registration
    return registration


def tuned_methods() -> list[str]:
    """The registered methods whose defaults were chosen on dev, in registry order."""
    return [name for name, reg in REGISTRY.items() if reg.tuned]


def benchmark_methods() -> list[str]:
    """The methods the benchmarks run by default, in registry order.

    Those tuned on dev that run from their defaults alone (`Registration.standalone`).
    """
    return [name for name, reg in REGISTRY.items() if reg.tuned and reg.standalone]


def registration(name: str) -> Registration:
    """The registered method `name` (raises ValueError listing the registered ones)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]
