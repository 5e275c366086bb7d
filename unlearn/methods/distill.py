"""Distillation into a fresh student: what UNDO and rewind-and-distill share.

Both defences start the trainable model from other weights than the model being unlearned
(`Phase.init`: UNDO a noised copy of an unlearned teacher, `undo.py`; rewind-and-distill an early
pretraining checkpoint, `rewind_distill.py`) and then pull its next-token distributions onto frozen
teachers' with the forward KL at temperature 1, KL(p_teacher ‖ p_θ)
(`unlearn.losses.logit_kl_loss`):

- forget term (`ForgetSettings`): on forget text (the attack split), at the positions that predict
  a selected forget token (`--token_mask`; every token by default),
  L_f = (1/|P|) Σ_{(b,t)∈P} Σ_v p_teacher(v | x_≤t) (log p_teacher(v | x_≤t) − log p_θ(v | x_≤t)),
  P = {(b, t): token t + 1 of row b is selected};
- retain term (`RetainSettings`, against the retain teacher instead of the step graph's "base"):
  the same KL on every retain token by default, or next-token NLL, or the L2 distance or MSE of
  block outputs to the retain teacher's.

`copy_weights_` sets a model's weights to another's (the students' starting points), after
`check_same_parameters`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from interventions import Read
from unlearn.losses import logit_kl_loss
from unlearn.methods.base import FORGET, TRAINABLE, ForgetSettings, Node, Term, TermFn
from unlearn.methods.lens_unlearn import predicting
from unlearn.methods.retain import RetainSettings
from unlearn.models import load_model

TEACHER = "teacher"
"""Model name of a distillation teacher in the step graph."""


def check_same_parameters(model: nn.Module, source: nn.Module) -> None:
    """Raise ValueError unless the two models' parameters have the same names and shapes."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    other = {name: tuple(p.shape) for name, p in source.named_parameters()}
    if shapes != other:
        differ = sorted(set(shapes.items()) ^ set(other.items()))[:4]
        raise ValueError(
            "the student and the model it starts from have different parameters (a teacher or "
            f"checkpoint of another architecture?): {differ}"
        )


def copy_weights_(model: nn.Module, source: nn.Module) -> None:
    """Set every parameter of `model` to `source`'s, in place (buffers are left as they are).

    Raises:
        ValueError: The two models' parameters differ in names or shapes (`check_same_parameters`).
    """
    check_same_parameters(model, source)
    origin = dict(source.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(origin[name].to(param.device, param.dtype))


def load_frozen(source: str, device: str, revision: str | None = None) -> nn.Module:
    """A model (a teacher, a checkpoint) loaded onto `device`, frozen, in eval mode."""
    model = load_model(source, revision=revision, device=device).hf_model
    # Moved again: on the emulated device of tests.other_device, the nnsight wrapper that
    # `load_model` adds leaves the weights on the host; on a real device this is a no-op.
    return model.to(device).eval().requires_grad_(False)


def forget_distillation_term(logits: str, teacher_logits: str) -> TermFn:
    """KL(p_teacher ‖ p_θ) on forget text at the positions that predict selected tokens.

    Args:
        logits: Key of the trainable model's forget logits in the step's activations.
        teacher_logits: Key of the teacher's forget logits (read without gradient).
    """

    def term(acts, forget, retain):
        student = acts[logits]
        teacher = acts[teacher_logits].to(student.device)
        return logit_kl_loss(student, teacher, predicting(forget.token_mask))

    return term


class Distillation:
    """Nodes, terms and frozen teachers of distillation on forget and retain text."""

    def __init__(
        self,
        forget: ForgetSettings,
        retain: RetainSettings,
        forget_teacher: str,
        retain_teacher: str,
        models: Mapping[str, nn.Module],
    ) -> None:
        """Declare the forget KL (dropped at coefficient 0) and the retain term.

        Args:
            forget: Weight and schedule of the forget-text KL.
            retain: The retain term, compared with `retain_teacher`.
            forget_teacher: Model name whose forget-text logits are the targets ("base" or a
                name in `models`).
            retain_teacher: Model name the retain term compares with.
            models: The frozen extra models by name (frozen here, not copied).
        """
        self.models = {name: model.eval().requires_grad_(False) for name, model in models.items()}
        nodes: list[Node] = []
        terms: list[Term] = []
        if forget.forget_coef != 0:
            nodes += [
                Read("forget_logits", "unembed", model=TRAINABLE, batch=FORGET),
                Read(
                    "forget_teacher_logits",
                    "unembed",
                    model=forget_teacher,
                    batch=FORGET,
                    grad=False,
                ),
            ]
            terms.append(
                forget.term(forget_distillation_term("forget_logits", "forget_teacher_logits"))
            )
        retain_part = retain.component(reference=retain_teacher)
        self.nodes: tuple[Node, ...] = (*nodes, *retain_part.nodes)
        self.terms: tuple[Term, ...] = (*terms, *retain_part.terms)
