import json

import pytest
import torch

from tests.conftest import TINY_TEXTS
from unlearn.data import tokenize_documents
from unlearn.models import list_checkpoints
from unlearn.transfer import (
    AffineStats,
    CheckpointScore,
    fit_affine_maps,
    select_checkpoint,
    sweep_checkpoints,
    write_sweep,
)


def test_select_latest_checkpoint_near_chance():
    """Chance 0.25 + margin 0.05 -> eligible if forget <= 0.30; the latest eligible is step4."""
    scores = [
        CheckpointScore("step0", 0.26),
        CheckpointScore("step2", 0.31),
        CheckpointScore("step4", 0.29),
        CheckpointScore("step8", 0.80),
    ]
    assert select_checkpoint(scores).revision == "step4"
    assert select_checkpoint(scores, margin=0.1).revision == "step4"
    assert select_checkpoint(scores, margin=0.6).revision == "step8"
    with pytest.raises(ValueError, match="step0: 0.260"):
        select_checkpoint(scores, margin=0.0)


def test_affine_stats_recover_a_known_map():
    """y = W x + b exactly (no noise, ridge ~0) -> the solution is (W, b); streaming in chunks
    equals one batch."""
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = torch.randn(200, 4, dtype=torch.float64)
    y = x @ weight.T + bias
    streamed, whole = AffineStats(4, 3), AffineStats(4, 3)
    for chunk in range(0, 200, 37):
        streamed.update(x[chunk : chunk + 37], y[chunk : chunk + 37])
    whole.update(x, y)
    assert streamed.n == 200
    torch.testing.assert_close(streamed.xx, whole.xx)
    fitted = streamed.solve(ridge=0.0)
    torch.testing.assert_close(fitted.weight.double(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fitted.bias.double(), bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no activations"):
        AffineStats(4, 3).solve()


def test_ridge_shrinks_the_weight():
    torch.manual_seed(0)
    x = torch.randn(50, 4)
    y = 2.0 * x
    free, shrunk = AffineStats(4, 4), AffineStats(4, 4)
    free.update(x, y)
    shrunk.update(x, y)
    assert shrunk.solve(ridge=1.0).weight.norm() < free.solve(ridge=0.0).weight.norm()


def test_fit_maps_between_identical_models_is_the_identity(tiny_lm):
    """Teacher == student -> the affine map is ~identity and both held-out errors ~0."""
    model, tokenizer = tiny_lm
    rows = tokenize_documents(tokenizer, [{"text": t} for t in TINY_TEXTS * 3], max_len=32)
    batches = [rows.batch([i, i + 1]) for i in range(0, 12, 2)]
    maps, mse = fit_affine_maps(model, model, batches, layers=[0, 1], ridge=1e-6)
    for layer in (0, 1):
        assert mse["identity"][layer] == 0.0
        assert mse["affine"][layer] < 1e-6
    with pytest.raises(ValueError, match="held-out"):
        fit_affine_maps(model, model, batches[:1], layers=[0])


def test_sweep_and_write_on_tiny_world_checkpoints(tiny_world, tmp_path):
    source = tiny_world.model_dir("unfiltered")
    revisions = list_checkpoints(source)[:3]
    items = tiny_world.items("forget_heldout")[:20]
    scores = sweep_checkpoints(str(source), revisions, items, tiny_world.items("retain")[:20])
    assert [s.revision for s in scores] == revisions
    assert all(0 <= s.forget_acc <= 1 and s.retain_acc is not None for s in scores)
    chosen = select_checkpoint(scores, margin=1.0)
    assert chosen == scores[-1]
    write_sweep(scores, chosen, tmp_path)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["chosen"] == revisions[-1] and len(saved["scores"]) == 3
    assert (tmp_path / "sweep.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match="no checkpoints"):
        sweep_checkpoints(str(source), [], items)


def test_map_statistics_and_sweep_run_through_nnsights_remote_simulation(tiny_lm, tiny_world):
    """remote="local" serializes each trace as NDIF would; the numbers match local runs."""
    model, tokenizer = tiny_lm
    rows = tokenize_documents(tokenizer, [{"text": t} for t in TINY_TEXTS * 2], max_len=32)
    batches = [rows.batch([i, i + 1]) for i in range(0, 8, 2)]
    _, local = fit_affine_maps(model, model, batches, layers=[1])
    _, simulated = fit_affine_maps(model, model, batches, layers=[1], remote="local")
    assert simulated["affine"][1] == pytest.approx(local["affine"][1], abs=1e-6)
    source = str(tiny_world.model_dir("unfiltered"))
    items = tiny_world.items("forget_heldout")[:8]
    (here,) = sweep_checkpoints(source, ["step8"], items)
    (there,) = sweep_checkpoints(source, ["step8"], items, remote="local")
    assert there.forget_acc == pytest.approx(here.forget_acc)


def test_checkpoint_transfer_forget_term_is_masked_mse_to_the_mapped_teacher(tiny_lm, tmp_path):
    """Layer 0, identity map: L_f = Σ_{b,s} m_bs mean_d (h_teacher − h_model)² / Σ m, with
    h = HF hidden_states[1] (block 0's output); with a map A: the same with A(h_teacher)."""
    import copy

    from interventions import StepGraph
    from unlearn.methods import BASE, FORGET, RETAIN, TRAINABLE, CheckpointTransfer
    from unlearn.methods import CheckpointTransferConfig as Config
    from unlearn.methods.base import extra_models
    from unlearn.transfer import AffineMap, save_maps

    model, tokenizer = tiny_lm
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    rows = tokenize_documents(tokenizer, [{"text": t} for t in TINY_TEXTS], max_len=32)
    batch = rows.batch([0, 1, 2])
    with torch.no_grad():
        h_model = model(
            batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[1]
        h_teacher = teacher(
            batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[1]
    mask = batch.token_mask.float()
    d = model.config.hidden_size
    shift = AffineMap(torch.eye(d), torch.full((d,), 0.5))
    save_maps({0: shift}, tmp_path / "maps")
    for maps_path, target in ((None, h_teacher), (str(tmp_path / "maps"), h_teacher + 0.5)):
        method = CheckpointTransfer(
            Config(
                teacher=str(tmp_path / "teacher"), maps_path=maps_path, layers=[0], retain_coef=0.0
            ),
            n_layers=2,
        )
        models = {TRAINABLE: model, BASE: model, **extra_models(method)}
        acts = StepGraph(list(method.nodes)).compile(models)({FORGET: batch, RETAIN: batch})
        (term,) = method.terms
        expected = (((target - h_model) ** 2).mean(-1) * mask).sum() / mask.sum()
        assert term.fn(acts, batch, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs a teacher"):
        CheckpointTransfer(Config(), n_layers=2)


def test_ridge_solution_matches_numpy_lstsq_with_the_same_penalty():
    """Ridge with penalty λ·s on the weights only (s = mean of diag(XᵀX), bias unpenalized) is the
    least-squares solution of [X̃; sqrt(λs)·[I 0]] β = [Y; 0], with X̃ = [X, 1]."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = x @ rng.normal(size=(5, 3)) + 0.3 * rng.normal(size=(60, 3)) + 1.0
    ridge = 0.2
    stats = AffineStats(5, 3)
    stats.update(torch.from_numpy(x), torch.from_numpy(y))
    fitted = stats.solve(ridge=ridge)
    x1 = np.hstack([x, np.ones((60, 1))])
    scale = np.mean(np.diag(x1.T @ x1)[:5])
    penalty_rows = np.hstack([np.sqrt(ridge * scale) * np.eye(5), np.zeros((5, 1))])
    beta, *_ = np.linalg.lstsq(
        np.vstack([x1, penalty_rows]), np.vstack([y, np.zeros((5, 3))]), rcond=None
    )
    np.testing.assert_allclose(fitted.weight.numpy(), beta[:5].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted.bias.numpy(), beta[5], rtol=1e-5, atol=1e-6)
