"""The defences that aim to survive a fine-tuning attack (issue 19): UNDO's noise step, the
distillation KL of UNDO and rewind-and-distill, the sharpness-aware step of the training core
against a plain-PyTorch two-pass reference, and end-to-end runs on the tiny toy world that train
on no dev or test text."""

import copy
import dataclasses
import functools
import json
import math

import pytest
import torch
from torch import nn

from tests.other_device import is_on_device, other_device
from tests.unlearn.test_baselines import _answer_texts
from tests.unlearn.test_methods import FORGET_DOCS, MAX_LEN, RETAIN_DOCS, _context
from unlearn.config import DataConfig, ModelConfig, OptimSettings, replace_flat
from unlearn.data import Batch, PairedBatches, tokenize_documents
from unlearn.methods import BASE, REGISTRY, GradDiff, GradDiffConfig, Phase, registration
from unlearn.methods.distill import TEACHER, copy_weights_
from unlearn.methods.retain import RetainSettings
from unlearn.methods.rewind_distill import ORIGINAL
from unlearn.methods.undo import noise_weights_, start_from_noised_copy
from unlearn.training import METRICS_FILE, LoraSettings, train, train_plan

# --- UNDO's noise step --------------------------------------------------------------------------


class _HandMade(nn.Module):
    """A 2-D embedding, a 2-D linear weight with a 1-D bias, a 1-D norm: weights set by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.proj = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        with torch.no_grad():
            self.embed.weight.copy_(torch.arange(12.0).reshape(4, 3) / 10)
            self.proj.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
            self.proj.bias.copy_(torch.tensor([0.25, -4.0]))
            self.norm.weight.copy_(torch.tensor([2.0, -1.0]))
            self.norm.bias.copy_(torch.tensor([0.5, 8.0]))


def test_noise_step_shrinks_vectors_and_mixes_xavier_noise_into_matrices():
    """θ ← (1 − α)θ + αβN with α = 0.6, β = 0.1, seed 7.

    Vectors (bias, norm weight and bias) only shrink: exactly 0.4 θ. Matrices get N drawn in
    parameter order from one generator seeded 7, Xavier-uniform with gain 1: N ~ U(−a, a),
    a = sqrt(6 / (fan_in + fan_out)), fan_in = columns and fan_out = rows, so a = sqrt(6/7) for the
    4×3 embedding and sqrt(6/5) for the 2×3 weight (vectors draw nothing).
    """
    alpha, beta, seed = 0.6, 0.1, 7
    model = _HandMade()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    noise_weights_(model, alpha, beta, seed)

    generator = torch.Generator().manual_seed(seed)
    bounds = {"embed.weight": math.sqrt(6 / 7), "proj.weight": math.sqrt(6 / 5)}
    for name, param in model.named_parameters():
        theta = original[name]
        if name in bounds:
            draw = torch.empty(theta.shape).uniform_(
                -bounds[name], bounds[name], generator=generator
            )
            expected = (1.0 - alpha) * theta + alpha * beta * draw
            assert torch.allclose(param, expected, rtol=0, atol=1e-7), name
            assert ((param - (1.0 - alpha) * theta).abs() <= alpha * beta * bounds[name]).all()
        else:
            assert param.ndim == 1
            assert torch.equal(param, theta * (1.0 - alpha)), name

    again = _HandMade()
    noise_weights_(again, alpha, beta, seed)
    pairs = zip(again.parameters(), model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other = _HandMade()
    noise_weights_(other, alpha, beta, seed + 1)
    assert not torch.equal(other.proj.weight, model.proj.weight)
    assert torch.equal(other.proj.bias, model.proj.bias)


def _saved_teacher(model, tokenizer, path):
    """A perturbed copy of `model` saved into `path` (a stand-in for an unlearned model)."""
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return teacher


def test_undo_starts_the_student_from_the_noised_teacher(tiny_lm, tmp_path):
    """The plan's `Phase.init` gives the teacher's weights noised with the run's seed (3 here)."""
    model, tokenizer = tiny_lm
    teacher = _saved_teacher(model, tokenizer, tmp_path / "teacher")
    cfg = registration("undo").config(teacher=str(tmp_path / "teacher"), alpha=0.3, beta=0.2)
    context = _context(model, tokenizer, tmp_path)
    context = dataclasses.replace(context, training=dataclasses.replace(context.training, seed=3))
    plan = registration("undo").build(cfg, context)
    assert plan.info == {"undo_noise_seed": 3}
    (phase,) = plan.phases
    student = copy.deepcopy(model)
    with torch.no_grad():
        phase.init(student)
    expected = copy.deepcopy(teacher)
    noise_weights_(expected, 0.3, 0.2, 3)
    for (name, got), want in zip(student.named_parameters(), expected.parameters(), strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-6), name
    assert not torch.equal(
        student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    )
    # The teacher in the step graph is the frozen, un-noised teacher.
    frozen = phase.method.models[TEACHER]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.allclose(
        frozen.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    )


def test_undo_without_a_teacher_is_a_clear_error(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    undo = registration("undo")
    with pytest.raises(ValueError, match="--teacher"):
        undo.inputs(undo.default_config(), ModelConfig(), DataConfig())
    with pytest.raises(ValueError, match="--teacher"):
        undo.build(undo.default_config(), _context(model, tokenizer, tmp_path))
    with pytest.raises(ValueError, match=r"--alpha must be in \[0, 1\]"):
        undo.config(alpha=1.5)


def test_a_teacher_of_another_shape_is_refused(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    other = copy.deepcopy(model)
    other.embed_out = nn.Linear(model.config.hidden_size, 7, bias=False)
    with pytest.raises(ValueError, match="different parameters"):
        start_from_noised_copy(copy.deepcopy(model), other, 0.5, 0.1, 0)


def test_phase_init_runs_before_the_base_copy_and_again_on_resume(tiny_lm, tmp_path):
    """`Phase.init` sets the weights before `train` copies "base": the retain KL to "base" is 0 at
    the first step (trainable == base == the init weights, not the model passed in). A rerun of
    the finished LoRA run from the original model calls init again, so the merged weights (base
    from init, adapters from the saved state) are the same."""
    model, tokenizer = tiny_lm
    start = _saved_teacher(model, tokenizer, tmp_path / "start")
    method = GradDiff(GradDiffConfig(retain=RetainSettings(retain_loss="kl")))
    phases = [Phase(method, 2, init=functools.partial(copy_weights_, source=start))]
    kwargs = dict(out_dir=tmp_path / "run", optim=OptimSettings(lr=1e-2, warmup_steps=1))
    lora = LoraSettings(lora_rank=4)
    first = train_plan(copy.deepcopy(model), phases, _pairs(tokenizer), lora=lora, **kwargs)
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).open()]
    assert records[0]["step"] == 1 and records[0]["loss/retain"] == pytest.approx(0.0, abs=1e-7)
    assert records[1]["loss/retain"] > 0
    again = train_plan(copy.deepcopy(model), phases, _pairs(tokenizer), lora=lora, **kwargs)
    pairs = zip(first[-1].model.parameters(), again[-1].model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first[-1].model.gpt_neox.embed_in.weight, model.gpt_neox.embed_in.weight)


# --- the distillation KL ------------------------------------------------------------------------


def _logits(rows) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)


def test_distillation_kl_against_a_hand_computation(tiny_lm, tmp_path):
    """Forward KL(p_teacher ‖ p_θ), temperature 1, over a 2-token vocabulary.

    Forget row: 4 tokens, token mask selecting tokens 1 and 2, so the positions that predict them,
    0 and 1, are scored (2 and 3 are not, whatever their logits):
      position 0: teacher (0, 0) -> (½, ½), student (0, ln 3) -> (¼, ¾):
                  ½ ln(½/¼) + ½ ln(½/¾) = ½ ln(4/3);
      position 1: teacher (ln 3, 0) -> (¾, ¼), student (0, 0) -> (½, ½):
                  ¾ ln(3/2) + ¼ ln(1/2);
      forget term = their mean.
    Retain row: 3 tokens, the last padding: positions 0 and 1 are scored (every real token):
      position 0: identical logits -> 0;
      position 1: teacher (0, ln 3) -> (¼, ¾), student (0, 0) -> (½, ½):
                  ¼ ln(¼/½) + ¾ ln(¾/½);
      retain term = their mean. Both terms weigh 1 over the whole run (constant ramps).
    """
    model, tokenizer = tiny_lm
    _saved_teacher(model, tokenizer, tmp_path / "teacher")
    cfg = registration("undo").config(teacher=str(tmp_path / "teacher"))
    (phase,) = registration("undo").build(cfg, _context(model, tokenizer, tmp_path)).phases
    method = phase.method
    reads = {node.name: node.model for node in method.nodes}
    assert reads == {
        "forget_logits": "trainable",
        "forget_teacher_logits": TEACHER,
        "retain_logits": "trainable",
        "retain_ref_logits": TEACHER,
    }
    ln3 = math.log(3.0)
    acts = {
        "forget_logits": _logits([[0.0, ln3], [0.0, 0.0], [5.0, -5.0], [9.0, 0.0]]),
        "forget_teacher_logits": _logits([[0.0, 0.0], [ln3, 0.0], [-5.0, 5.0], [0.0, 9.0]]),
        "retain_logits": _logits([[1.0, 2.0], [0.0, 0.0], [7.0, 0.0]]),
        "retain_ref_logits": _logits([[1.0, 2.0], [0.0, ln3], [0.0, 7.0]]),
    }
    forget = Batch(
        torch.tensor([[5, 6, 7, 8]]),
        torch.ones(1, 4, dtype=torch.long),
        torch.tensor([[False, True, True, False]]),
    )
    retain = Batch(
        torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), torch.tensor([[True, True, False]])
    )
    values = {term.name: float(term.fn(acts, forget, retain)) for term in method.terms}
    forget_kl = (0.5 * math.log(4 / 3) + (0.75 * math.log(1.5) + 0.25 * math.log(0.5))) / 2
    retain_kl = (0.0 + 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)) / 2
    assert values == pytest.approx({"forget": forget_kl, "retain": retain_kl}, rel=1e-6)
    assert [term.weight(p) for term in method.terms for p in (0.0, 1.0)] == [1.0] * 4


def test_rewind_distill_reads_the_original_on_retain_and_the_checkpoint_on_forget(
    tiny_lm, tmp_path
):
    """Without --teacher the forget KL targets "base" (the checkpoint, as training starts); the
    retain KL targets a frozen copy of the model as loaded; the student starts from the
    checkpoint's weights. With --teacher the forget KL targets that teacher."""
    model, tokenizer = tiny_lm
    checkpoint = _saved_teacher(model, tokenizer, tmp_path / "ckpt" / "checkpoints" / "step1")
    _saved_teacher(model, tokenizer, tmp_path / "ckpt")
    rewind = registration("rewind_distill")
    cfg = rewind.config(checkpoint=str(tmp_path / "ckpt"), checkpoint_revision="step1")
    plan = rewind.build(cfg, _context(model, tokenizer, tmp_path))
    assert plan.info == {"rewind_checkpoint": "step1"}
    (phase,) = plan.phases
    reads = {node.name: node.model for node in phase.method.nodes}
    assert reads["forget_teacher_logits"] == BASE and reads["retain_ref_logits"] == ORIGINAL
    original = phase.method.models[ORIGINAL]
    assert original is not model and torch.equal(
        original.get_output_embeddings().weight, model.get_output_embeddings().weight
    )
    student = copy.deepcopy(model)
    with torch.no_grad():
        phase.init(student)
    for got, want in zip(student.parameters(), checkpoint.parameters(), strict=True):
        assert torch.equal(got, want)

    _saved_teacher(model, tokenizer, tmp_path / "unlearned")
    taught = rewind.build(
        replace_flat(cfg, teacher=str(tmp_path / "unlearned")), _context(model, tokenizer, tmp_path)
    )
    reads = {node.name: node.model for node in taught.phases[0].method.nodes}
    assert reads["forget_teacher_logits"] == TEACHER and set(taught.phases[0].method.models) == {
        ORIGINAL,
        TEACHER,
    }


# --- the sharpness-aware step -------------------------------------------------------------------


def _pairs(tokenizer) -> PairedBatches:
    forget = tokenize_documents(tokenizer, FORGET_DOCS, max_len=MAX_LEN)
    retain = tokenize_documents(tokenizer, RETAIN_DOCS, max_len=MAX_LEN)
    return PairedBatches(forget, retain, batch_size=4)


def _mean_logprob(model, batch, mask) -> torch.Tensor:
    """Mean over tokens t ≥ 1 with mask[t] of log softmax(logits[t − 1])[x_t], by hand."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    scored = mask[:, 1:].float()
    return (logprobs * scored).sum() / scored.sum()


def _one_gradient_difference_step(model, pairs, optim, out_dir) -> nn.Module:
    """The training core's model after one step of gradient difference under `optim`."""
    return train(
        copy.deepcopy(model),
        GradDiff(GradDiffConfig()),
        pairs,
        num_steps=1,
        out_dir=out_dir,
        optim=optim,
    ).model


def _assert_same_step(trained, params, grads, optim) -> None:
    """`trained` holds `grads` and the weights one AdamW step (no decay) of them moves `params` to.

    AdamW's first step is about lr·g/(|g| + ε), ε = 1e-8: where the exact gradient is 0 (the
    attention key biases), float noise of |g| ≤ 1e-10 moves a weight by up to lr/100, differently
    in the two computations.
    """
    for (name, param), grad in zip(trained.named_parameters(), grads, strict=True):
        assert torch.allclose(param.grad, grad, rtol=1e-4, atol=1e-6), name
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=0.0).step()
    for (name, param), want in zip(trained.named_parameters(), params, strict=True):
        assert torch.allclose(param, want, rtol=0, atol=optim.lr / 100), name


def test_sharpness_aware_step_matches_a_two_pass_reference(tiny_lm, tmp_path):
    """One step of gradient difference with --sam_rho 0.05 (no clipping, no warmup, AdamW).

    Reference, plain PyTorch on the same batch: L_f(θ) = mean selected forget log-prob (ascent),
    L_r(θ) = retain NLL; g_f = ∇L_f(θ); δ = ρ g_f / ‖g_f‖ over every parameter; the step's gradient
    is ∇L_r(θ) + ∇L_f(θ + δ), taken at θ (weights restored), then one AdamW step. The training
    core must leave the same gradients and weights, and log L_f(θ + δ) as loss/sam_forget; with
    --sam_rho 0 (the default) it leaves the plain gradient ∇L_r(θ) + ∇L_f(θ).
    """
    model, tokenizer = tiny_lm
    rho, lr = 0.05, 1e-2
    optim = OptimSettings(lr=lr, warmup_steps=0, grad_clip=0.0, sam_rho=rho)
    pairs = _pairs(tokenizer)
    trained = _one_gradient_difference_step(model, pairs, optim, tmp_path / "sam")

    reference = copy.deepcopy(model).train()
    params = list(reference.parameters())
    forget, retain = pairs.at(0)
    forget_grads = torch.autograd.grad(_mean_logprob(reference, forget, forget.token_mask), params)
    retain_grads = torch.autograd.grad(
        -_mean_logprob(reference, retain, retain.attention_mask), params
    )
    norm = torch.sqrt(sum((g**2).sum() for g in forget_grads))
    with torch.no_grad():
        for param, grad in zip(params, forget_grads, strict=True):
            param.add_(rho * grad / norm)
    perturbed = _mean_logprob(reference, forget, forget.token_mask)
    sharp_grads = torch.autograd.grad(perturbed, params)
    with torch.no_grad():
        for param, grad in zip(params, forget_grads, strict=True):
            param.sub_(rho * grad / norm)
    grads = [r + s for r, s in zip(retain_grads, sharp_grads, strict=True)]
    plain = [r + f for r, f in zip(retain_grads, forget_grads, strict=True)]
    assert max(float((g - p).abs().max()) for g, p in zip(grads, plain, strict=True)) > 1e-4
    unsharpened = _one_gradient_difference_step(
        model, pairs, dataclasses.replace(optim, sam_rho=0.0), tmp_path / "plain"
    )
    for (name, param), grad in zip(unsharpened.named_parameters(), plain, strict=True):
        assert torch.allclose(param.grad, grad, rtol=1e-4, atol=1e-6), name  # --sam_rho 0: plain
    assert "loss/sam_forget" not in (tmp_path / "plain" / METRICS_FILE).read_text()
    with pytest.raises(ValueError, match="--sam_rho must be >= 0"):
        OptimSettings(sam_rho=-0.1)

    _assert_same_step(trained, params, grads, optim)
    (record,) = [json.loads(line) for line in (tmp_path / "sam" / METRICS_FILE).open()]
    assert record["loss/sam_forget"] == pytest.approx(float(perturbed.detach()), rel=1e-5)


def test_the_sharpness_aware_step_runs_on_the_device(tiny_lm, tmp_path):
    """Two sharpness-aware steps with the model on the second device log the CPU run's losses."""
    model, tokenizer = tiny_lm
    optim = OptimSettings(lr=1e-3, warmup_steps=1, sam_rho=0.1)
    kwargs = dict(num_steps=2, optim=optim, seed=3)
    train(
        copy.deepcopy(model),
        GradDiff(GradDiffConfig()),
        _pairs(tokenizer),
        out_dir=tmp_path / "cpu",
        **kwargs,
    )
    with other_device() as device:
        result = train(
            copy.deepcopy(model).to(device),
            GradDiff(GradDiffConfig()),
            _pairs(tokenizer),
            out_dir=tmp_path / "dev",
            **kwargs,
        )
        assert all(is_on_device(p) for p in result.model.parameters())
    cpu, dev = (
        [json.loads(line) for line in (tmp_path / run / METRICS_FILE).open()]
        for run in ("cpu", "dev")
    )
    for want, got in zip(cpu, dev, strict=True):
        for key in ("loss/forget", "loss/retain", "loss/sam_forget"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_tamper_resistant_step_matches_a_plain_reference(tiny_lm, tmp_path):
    """One step of gradient difference with --tar_steps 2 --tar_lr 1e-2 (no clipping, AdamW).

    Reference, plain PyTorch: L_r(θ) = retain NLL at θ; a copy θ' takes 2 steps of a fresh AdamW
    (lr 1e-2, no weight decay) on the forget batches the run's stream holds past its last step
    (steps 1 and 2 of a 1-step run), each on the next-token NLL of every real token; then
    L_f(θ') = mean selected forget log-prob (ascent). The step's gradient is ∇L_r(θ) +
    ∇_θ' L_f(θ') (first order), the weights stay θ until the outer AdamW step; loss/tar_forget
    logs L_f(θ').
    """
    model, tokenizer = tiny_lm
    lr, tar_lr = 1e-2, 1e-2
    optim = OptimSettings(lr=lr, warmup_steps=0, grad_clip=0.0, tar_steps=2, tar_lr=tar_lr)
    pairs = _pairs(tokenizer)
    trained = _one_gradient_difference_step(model, pairs, optim, tmp_path / "tar")

    reference = copy.deepcopy(model).train()
    params = list(reference.parameters())
    forget, retain = pairs.at(0)
    retain_grads = torch.autograd.grad(
        -_mean_logprob(reference, retain, retain.attention_mask), params
    )
    attacked = copy.deepcopy(reference)
    attack_params = list(attacked.parameters())
    inner = torch.optim.AdamW(attack_params, lr=tar_lr, weight_decay=0.0)
    for k in range(2):
        batch, _ = pairs.at(1 + k)
        (-_mean_logprob(attacked, batch, batch.attention_mask)).backward()
        inner.step()
        inner.zero_grad()
    after_attack = _mean_logprob(attacked, forget, forget.token_mask)
    attacked_grads = torch.autograd.grad(after_attack, attack_params)
    grads = [r + a for r, a in zip(retain_grads, attacked_grads, strict=True)]
    _assert_same_step(trained, params, grads, optim)
    (record,) = [json.loads(line) for line in (tmp_path / "tar" / METRICS_FILE).open()]
    assert record["loss/tar_forget"] == pytest.approx(float(after_attack.detach()), rel=1e-5)
    # The attack moved the weights: the forget loss after it differs from the one before.
    assert abs(record["loss/tar_forget"] - record["loss/forget"]) > 1e-3


def test_tamper_resistant_settings_are_checked():
    from unlearn.training import check_parallel

    with pytest.raises(ValueError, match="--tar_steps must be >= 0"):
        OptimSettings(tar_steps=-1)
    with pytest.raises(ValueError, match="--tar_steps and --sam_rho"):
        OptimSettings(tar_steps=2, sam_rho=0.1)
    with pytest.raises(ValueError, match="only the adapters"):
        check_parallel(OptimSettings(tar_steps=2), LoraSettings(8), 1)
    with pytest.raises(ValueError, match="--tar_steps simulates an attack on this rank"):
        check_parallel(OptimSettings(tar_steps=2), None, 2)
    check_parallel(OptimSettings(tar_steps=2), None, 1)


# --- end to end on the tiny world ---------------------------------------------------------------

E2E = {
    "undo": ["--teacher", "<filtered>"],
    "rewind_distill": ["--margin", "1.0"],
    "rewind_distill-teacher": ["--margin", "1.0", "--teacher", "<filtered>"],
    "grad_diff-sam": ["--sam_rho", "0.05"],
    "tar": ["--tar_steps", "2"],
    "grad_diff-tar": ["--tar_steps", "2"],
}
"""Runs of the defences through the generic recipe; "<filtered>" is the tiny world's filtered
twin, a stand-in for an unlearned teacher."""


@pytest.mark.parametrize("case", list(E2E))
def test_defences_run_end_to_end_on_no_dev_or_test_text(case, tiny_home, tmp_path, monkeypatch):
    """Two steps through `python -m recipes.unlearn --method <name> --world_preset tiny
    --num_steps 2 --batch_size 4`, with the method's `build` and the training core spied on: the
    documents `build` sees are the world's forget_attack and retain corpora, its tuning items
    hold no test split, and the text the training core batches (decoded) names no dev or test
    entity and states no dev or test item's fact, while it does state attack items' facts."""
    from recipes import unlearn as generic
    from unlearn import experiment
    from unlearn.toyworld.world import DEV, TEST

    name = case.split("-")[0]
    world = tiny_home
    flags = [str(world.model_dir("filtered")) if f == "<filtered>" else f for f in E2E[case]]
    seen = {}
    real_build, real_train_plan = REGISTRY[name].build, experiment.train_plan

    def build(cfg, ctx):
        seen["ctx"] = ctx
        return real_build(cfg, ctx)

    def spy_train_plan(model, phases, batches, **kwargs):
        seen["batches"] = batches
        return real_train_plan(model, phases, batches, **kwargs)

    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], build=build))
    monkeypatch.setattr(experiment, "train_plan", spy_train_plan)
    out = tmp_path / case
    args = ["--method", name, "--world_preset", "tiny", "--num_steps", "2", "--batch_size", "4"]
    generic.main([*args, *flags, "--eval_every", "0", "--out", str(out)])

    results = json.loads((out / "results.json").read_text())
    assert results["num_steps"] == 2 and math.isfinite(results["forget_acc"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in losses] == [1, 2]
    assert all(math.isfinite(r["loss/forget"]) and math.isfinite(r["loss/retain"]) for r in losses)
    assert all(("loss/sam_forget" in r) == case.endswith("sam") for r in losses)
    assert all(("loss/tar_forget" in r) == case.endswith("tar") for r in losses)
    info = json.loads((out / "run_info.json").read_text())["config"]
    if name == "rewind_distill":
        assert info["rewind_checkpoint"].startswith("step")

    ctx, batches = seen["ctx"], seen["batches"]
    assert ctx.forget_docs == world.corpus("forget_attack")
    assert ctx.retain_docs == world.corpus("retain")
    assert all(TEST not in splits for splits in ctx.items.values())
    texts = [
        ctx.tokenizer.decode(ids, skip_special_tokens=True)
        for docs in (batches.forget, batches.retain)
        for ids in docs.ids
    ]
    held_out = world.items(DEV, template=None) + world.items(TEST, template=None)
    entities = {item["entity"] for item in held_out}
    facts = _answer_texts(held_out)
    assert entities and facts
    assert not [e for e in entities if any(e in text for text in texts)]
    assert not [f for f in facts if any(f in text for text in texts)]
    attack = _answer_texts(world.items("forget_attack", template="seen"))
    assert any(f in text for f in attack for text in texts)
