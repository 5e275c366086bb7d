import json

import pytest
import torch

from tests.conftest import TINY_TEXTS
from unlearn.checkpoints import CheckpointScore, select_checkpoint, sweep_checkpoints, write_sweep
from unlearn.config import replace_flat
from unlearn.data import tokenize_documents
from unlearn.maps import AffineStats, fit_affine_maps
from unlearn.models import list_checkpoints


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
    fitted = fit_affine_maps(model, model, batches, layers=[0, 1], ridge=1e-6, svcca_variance=0.9)
    mse = fitted.mse
    assert set(mse) == {"affine", "svcca", "identity"}
    for layer in (0, 1):
        assert mse["identity"][layer] == 0.0
        assert mse["affine"][layer] < 1e-6
        # x == y: every kept canonical pair correlates perfectly, the same dims on both sides.
        fit = fitted.svcca[layer]
        assert fit.dims_in == fit.dims_out < model.config.hidden_size
        torch.testing.assert_close(fit.correlations, torch.ones_like(fit.correlations))
    assert set(fit_affine_maps(model, model, batches, layers=[0]).mse) == {"affine", "identity"}
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
    local = fit_affine_maps(model, model, batches, layers=[1]).mse
    simulated = fit_affine_maps(model, model, batches, layers=[1], remote="local").mse
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
    from unlearn.maps import AffineMap, save_maps
    from unlearn.methods import BASE, FORGET, RETAIN, TRAINABLE, CheckpointTransfer
    from unlearn.methods import CheckpointTransferConfig as Config
    from unlearn.methods.base import extra_models

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
            replace_flat(
                Config(),
                teacher=str(tmp_path / "teacher"),
                maps_path=maps_path,
                layers=[0],
                retain_coef=0.0,
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


def _svcca_data(n=500, seed=0):
    """x: 500x6 of rank 5, one of the 5 directions holding ~0.015% of the variance; y: 500x5, a
    linear function of x plus noise, one column of tiny independent noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scales = np.array([3.0, 2.0, 1.5, 1.0, 0.05])
    basis, _ = np.linalg.qr(rng.normal(size=(6, 5)))  # orthonormal columns
    x = (rng.normal(size=(n, 5)) * scales) @ basis.T + rng.normal(size=6)
    y = np.hstack(
        [
            x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(n, 4)),
            0.01 * rng.normal(size=(n, 1)),
        ]
    )
    return x, y + 2.0


def _reduce(data, share):
    """Centred data projected on its top-k right singular vectors, k the fewest holding `share`
    of sum(s²); returns (reduced data, basis [d, k], mean)."""
    import numpy as np

    mean = data.mean(0)
    _, s, vt = np.linalg.svd(data - mean, full_matrices=False)
    cumulative = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(cumulative >= share)) + 1
    return (data - mean) @ vt[:k].T, vt[:k].T, mean


def test_svcca_matches_a_direct_svd_then_qr_cca():
    """Reference (numpy, from the data matrices): reduce each centred side by SVD to the top
    directions holding 99% of its variance; canonical correlations are the singular values of
    Q_xᵀ Q_y with Q from QR of each reduced side (Björck-Golub); the map is the least-squares
    regression of reduced y on reduced x, mapped back: W = P_y Bᵀ P_xᵀ, b = μ_y − W μ_x."""
    import numpy as np

    x, y = _svcca_data()
    x_red, basis_x, mean_x = _reduce(x, 0.99)
    y_red, basis_y, mean_y = _reduce(y, 0.99)
    # The cut drops x's null and tiny directions (4 of 6 kept) and at least y's noise column.
    assert x_red.shape[1] == 4 and y_red.shape[1] < 5
    q_x, _ = np.linalg.qr(x_red)
    q_y, _ = np.linalg.qr(y_red)
    expected_rho = np.linalg.svd(q_x.T @ q_y, compute_uv=False)
    coef, *_ = np.linalg.lstsq(x_red, y_red, rcond=None)  # [k_x, k_y]
    expected_weight = basis_y @ coef.T @ basis_x.T
    expected_bias = mean_y - expected_weight @ mean_x

    stats = AffineStats(6, 5)
    stats.update(torch.from_numpy(x), torch.from_numpy(y))
    fit = stats.svcca(variance=0.99)
    assert (fit.dims_in, fit.dims_out) == (x_red.shape[1], y_red.shape[1])
    np.testing.assert_allclose(fit.correlations.numpy(), expected_rho, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fit.map.weight.numpy(), expected_weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.map.bias.numpy(), expected_bias, rtol=1e-5, atol=1e-5)
    # Canonical variates: unit variance each side, cross-covariance diag(ρ) (1/n normalization).
    u = (x - x.mean(0)) @ fit.x_directions.numpy()
    v = (y - y.mean(0)) @ fit.y_directions.numpy()
    k = len(expected_rho)
    np.testing.assert_allclose(u.T @ u / len(x), np.eye(k), atol=1e-8)
    np.testing.assert_allclose(v.T @ v / len(y), np.eye(k), atol=1e-8)
    np.testing.assert_allclose(u.T @ v / len(x), np.diag(expected_rho), atol=1e-8)


def test_svcca_keeping_all_variance_of_full_rank_data_is_least_squares():
    """Share 1.0, full-rank x and y -> nothing is cut and the CCA-coordinate prediction is
    Cyx Cxx⁻¹: the least-squares fit of y on [x, 1] (numpy lstsq)."""
    import numpy as np

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)) + 1.0
    y = x @ rng.normal(size=(5, 4)) + 0.3 * rng.normal(size=(300, 4)) - 2.0
    beta, *_ = np.linalg.lstsq(np.hstack([x, np.ones((300, 1))]), y, rcond=None)
    stats = AffineStats(5, 4)
    stats.update(torch.from_numpy(x), torch.from_numpy(y))
    fit = stats.svcca(variance=1.0)
    assert (fit.dims_in, fit.dims_out, len(fit.correlations)) == (5, 4, 4)
    np.testing.assert_allclose(fit.map.weight.numpy(), beta[:5].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.map.bias.numpy(), beta[5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_svcca_rejects_a_variance_share_outside_zero_one(share, tiny_lm):
    stats = AffineStats(3, 2)
    stats.update(torch.randn(10, 3), torch.randn(10, 2))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        stats.svcca(share)
    model, tokenizer = tiny_lm
    rows = tokenize_documents(tokenizer, [{"text": t} for t in TINY_TEXTS], max_len=32)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        fit_affine_maps(model, model, [rows.batch([0]), rows.batch([1])], [0], svcca_variance=share)


def test_svcca_streamed_in_batches_equals_one_batch():
    x, y = (torch.from_numpy(a) for a in _svcca_data())
    streamed, whole = AffineStats(6, 5), AffineStats(6, 5)
    for start in range(0, 500, 120):
        streamed.update(x[start : start + 120], y[start : start + 120])
    whole.update(x, y)
    torch.testing.assert_close(streamed.yy, whole.yy)
    parts, one = streamed.svcca(0.95), whole.svcca(0.95)
    assert (parts.dims_in, parts.dims_out) == (one.dims_in, one.dims_out)
    torch.testing.assert_close(parts.correlations, one.correlations, rtol=0, atol=1e-10)
    torch.testing.assert_close(parts.map.weight, one.map.weight)
    torch.testing.assert_close(parts.map.bias, one.map.bias)
