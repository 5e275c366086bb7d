"""Tests for unlearn.losses: hand-derived values on 2-4 element tensors, plain-loop references,
padding invariance and the conventions of the orthogonality loss (the future kernel's reference).

Every loss is called through `jaxtyped(typechecker=beartype)`, so the shape annotations are checked.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from unlearn import losses


def _checked(fn):
    return jaxtyped(typechecker=beartype)(fn)


masked_mean = _checked(losses.masked_mean)
next_token_mask = _checked(losses.next_token_mask)
next_token_logprobs = _checked(losses.next_token_logprobs)
max_entropy_loss = _checked(losses.max_entropy_loss)
random_target_ce_loss = _checked(losses.random_target_ce_loss)
top_k_entropy_loss = _checked(losses.top_k_entropy_loss)
next_token_nll_loss = _checked(losses.next_token_nll_loss)
ce_maximization_loss = _checked(losses.ce_maximization_loss)
npo_loss = _checked(losses.npo_loss)
representation_l2_loss = _checked(losses.representation_l2_loss)
logit_kl_loss = _checked(losses.logit_kl_loss)
circuit_breaker_loss = _checked(losses.circuit_breaker_loss)
orthogonality_loss = _checked(losses.orthogonality_loss)
activation_mse_loss = _checked(losses.activation_mse_loss)

LN3 = math.log(3.0)


def _close(actual: torch.Tensor, expected: float, **kwargs) -> None:
    assert actual.shape == ()
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), **kwargs)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# masked_mean and next-token helpers


def test_masked_mean_ignores_unselected_values_even_non_finite():
    """values [1, 2, 3, inf], mask [1, 1, 1, 0] -> (1 + 2 + 3) / 3 = 2."""
    values = torch.tensor([1.0, 2.0, 3.0, float("inf")])
    _close(masked_mean(values, torch.tensor([True, True, True, False])), 2.0)
    _close(masked_mean(values, torch.tensor([1, 1, 1, 0])), 2.0)


def test_masked_mean_float_weights():
    """Weights [0.5, 1.5, 0, 0] on [2, 4, 8, 16]: (0.5*2 + 1.5*4) / 2 = 3.5."""
    values = torch.tensor([2.0, 4.0, 8.0, 16.0])
    _close(masked_mean(values, torch.tensor([0.5, 1.5, 0.0, 0.0])), 3.5)


def test_masked_mean_empty_mask_raises():
    with pytest.raises(ValueError, match="selects no position"):
        masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool))


def test_next_token_logprobs_hand_values():
    """V = 2, tokens [0, 1, 1, pad], mask [1, 1, 1, 0].

    Token 1 is read from logits[0] = [0, ln 3]: p = 3/4.
    Token 2 from logits[1] = [ln 3, 0]: p = 1/4.
    Token 0 is never scored, token 3 is padding: both exactly 0.
    """
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0], [5.0, -5.0], [9.0, 1.0]]])
    tokens = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    expected = torch.tensor([[0.0, math.log(3 / 4), math.log(1 / 4), 0.0]])
    torch.testing.assert_close(next_token_logprobs(logits, tokens, mask), expected)
    assert next_token_mask(mask).tolist() == [[False, True, True, False]]
    assert mask.tolist() == [[1, 1, 1, 0]]  # the input mask is not modified


# ----------------------------------------------------------------------------------------------
# Maximum entropy, random targets, top-k


def test_max_entropy_of_uniform_logits_is_zero():
    """Constant logits z: logsumexp = z + log V and mean = z, so KL(U || p) = 0 exactly."""
    logits = torch.full((2, 3, 4), 3.7)
    mask = torch.ones(2, 3, dtype=torch.bool)
    _close(max_entropy_loss(logits, mask), 0.0, atol=1e-6, rtol=0)
    _close(max_entropy_loss(logits, mask, normalize_by_log_vocab=False), 0.0, atol=1e-6, rtol=0)


def test_max_entropy_hand_value():
    """V = 4. Position 0: z = [0, 0, 0, ln 5], p = [1/8, 1/8, 1/8, 5/8].

    KL(U || p) = (1/4) sum log((1/4) / p_v) = (1/4) (3 log 2 + log(2/5)) = (1/4) log 3.2.
    Position 1: uniform, KL = 0. Position 2 is padding (garbage). Mean = (1/8) log 3.2; normalized:
    (1/8) log 3.2 / log 4.
    """
    logits = torch.tensor([[[0.0, 0.0, 0.0, math.log(5.0)], [1.0] * 4, [50.0, -9.0, 3.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    raw = math.log(3.2) / 8
    _close(max_entropy_loss(logits, mask, normalize_by_log_vocab=False), raw)
    _close(max_entropy_loss(logits, mask), raw / math.log(4))


def test_max_entropy_matches_kl_div_loop():
    """Plain reference: sum over positions of F.kl_div(log p, uniform) / count."""
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    uniform = torch.full((5,), 1 / 5)
    total, count = 0.0, 0
    for b in range(2):
        for s in range(3):
            if mask[b, s]:
                total += F.kl_div(logits[b, s].log_softmax(-1), uniform, reduction="sum")
                count += 1
    _close(max_entropy_loss(logits, mask, normalize_by_log_vocab=False), float(total / count))


def test_random_target_ce_of_uniform_logits_is_one():
    """Uniform p: every target has -log p_y = log V, so CE / log V = 1 for every draw."""
    logits = torch.zeros(2, 3, 7)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for seed in range(3):
        _close(random_target_ce_loss(logits, mask, _generator(seed)), 1.0)


def test_random_target_ce_is_unbiased_estimate():
    """V = 2, z = [0, ln 3], p = [1/4, 3/4]. Targets 0/1 with probability 1/2 each:

    E[-log p_y] / log 2 = (log 4 + log(4/3)) / (2 log 2) = 2 - (1/2) log2 3 = 1.20752...,
    which is 1 + KL(U || p) / log 2 = 1 + (1/2) log(4/3) / log 2. Per-draw values are 2 and 0.415
    (std 0.79), so the mean of 20,000 draws is within 0.006 (1 sigma) of it.
    """
    logits = torch.tensor([0.0, LN3]).expand(1, 20_000, 2)
    mask = torch.ones(1, 20_000, dtype=torch.bool)
    expected = 2 - 0.5 * math.log2(3)
    kl = max_entropy_loss(logits, mask).item()
    assert expected == pytest.approx(1 + kl, abs=1e-6)
    _close(random_target_ce_loss(logits, mask, _generator()), expected, atol=0.03, rtol=0)


def test_random_target_ce_matches_manual_draw():
    """The targets are one randint(V) per masked position, drawn in row-major order."""
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    targets = torch.randint(5, (3,), generator=_generator(7))
    expected = F.cross_entropy(logits[mask], targets) / math.log(5)
    _close(random_target_ce_loss(logits, mask, _generator(7)), expected.item())


def test_top_k_entropy_hand_value_and_gradient_only_on_top_k():
    """V = 4, k = 2. Top two logits [ln 3, 0] give q = [3/4, 1/4];

    KL(U_2 || q) = (1/2) log((1/2)/(3/4)) + (1/2) log((1/2)/(1/4)) = (1/2) log(4/3); / log 2.
    The two small logits get no gradient.
    """
    logits = torch.tensor([[[LN3, 0.0, -100.0, -100.0]]], requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = top_k_entropy_loss(logits, mask, k=2)
    _close(loss, 0.5 * math.log(4 / 3) / math.log(2))
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[0, 0, 2:].tolist() == [0.0, 0.0]
    assert logits.grad[0, 0, :2].abs().min() > 0


def test_top_k_entropy_with_k_at_least_vocab_is_max_entropy():
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = max_entropy_loss(logits, mask)
    torch.testing.assert_close(top_k_entropy_loss(logits, mask, k=5), expected)
    torch.testing.assert_close(top_k_entropy_loss(logits, mask, k=100), expected)
    with pytest.raises(ValueError, match="k >= 2"):
        top_k_entropy_loss(logits, mask, k=1)


# ----------------------------------------------------------------------------------------------
# Next-token NLL and its negation


def test_nll_and_ce_maximization_hand_values():
    """Same batch as test_next_token_logprobs_hand_values: scored log-probs log(3/4), log(1/4).

    NLL = -(log(3/4) + log(1/4)) / 2 = (1/2) log(16/3); CE maximization is its negation.
    """
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0], [5.0, -5.0], [9.0, 1.0]]])
    tokens = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[True, True, True, False]])
    _close(next_token_nll_loss(logits, tokens, mask), 0.5 * math.log(16 / 3))
    _close(ce_maximization_loss(logits, tokens, mask), -0.5 * math.log(16 / 3))


def test_nll_matches_hugging_face_style_cross_entropy():
    """Reference: shift, set labels of padding to -100, F.cross_entropy(ignore_index=-100)."""
    logits = torch.randn(3, 5, 7)
    tokens = torch.randint(7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    labels = tokens.masked_fill(mask == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    _close(next_token_nll_loss(logits, tokens, mask), expected.item())


# ----------------------------------------------------------------------------------------------
# NPO


@pytest.mark.parametrize("reduction", ["sequence_sum", "sequence_mean", "token"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_at_reference_is_two_log_two_over_beta(reduction, beta):
    """theta = ref: every log-ratio is 0 and -(2/beta) log sigmoid(0) = (2/beta) log 2."""
    logprobs = -torch.rand(2, 4)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    _close(
        npo_loss(logprobs, logprobs, mask, beta=beta, reduction=reduction), 2 / beta * math.log(2)
    )


def test_npo_hand_values():
    """beta = 1, one sequence with log-ratios r = [ln 6, -ln 2] and a padded garbage position.

    sequence_sum:  sum r = ln 3,  -2 log sigmoid(-ln 3) = 2 log(1 + 3) = 2 log 4.
    sequence_mean: mean r = (1/2) ln 3, -2 log sigmoid(-(1/2) ln 3) = 2 log(1 + sqrt 3).
    token: mean of 2 log(1 + 6) and 2 log(1 + 1/2) = log 7 + log 1.5 = log 10.5.
    beta = 0.5, sequence_sum: -(2/0.5) log sigmoid(-0.5 ln 3) = 4 log(1 + sqrt 3).
    A second, fully padded row is left out of the mean over rows.
    """
    ref = torch.tensor([[-3.0, -2.0, -1.0], [-1.0, -1.0, -1.0]])
    logprobs = ref + torch.tensor([[math.log(6), -math.log(2), 40.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    _close(npo_loss(logprobs, ref, mask, beta=1.0), 2 * math.log(4))
    _close(
        npo_loss(logprobs, ref, mask, beta=1.0, reduction="sequence_mean"), 2 * math.log(1 + 3**0.5)
    )
    _close(npo_loss(logprobs, ref, mask, beta=1.0, reduction="token"), math.log(10.5))
    _close(npo_loss(logprobs, ref, mask, beta=0.5), 4 * math.log(1 + 3**0.5))


def test_npo_gradient_at_reference_is_gradient_ascent():
    """sequence_sum: dL/dr_t = -(2/beta) * (-beta) * sigmoid(beta S) = 2 sigmoid(0) = 1 at S = 0,

    for every masked token (0 elsewhere), averaged over the 2 non-empty rows: 1/2 per token.
    """
    ref = -torch.rand(2, 3)
    logprobs = ref.clone().requires_grad_(True)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    npo_loss(logprobs, ref, mask, beta=0.1).backward()
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, mask / 2.0)


def test_npo_empty_mask_raises():
    with pytest.raises(ValueError, match="selects no position"):
        npo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Retain terms: representation L2, logit KL


def test_representation_l2_hand_value():
    """B = 1, positions 0, 1 real, 2 padding; d_model = 2.

    Layer 0: h - h0 = [3, 4] -> 5 and [0, 1] -> 1: mean 3. Layer 1: [6, 8] -> 10 and [0, 0] -> 0:
    mean 5. Average over layers: 4. The reference's nanmean over all 3 positions would give
    (6 + 10) / 3 / 2 = 2.67: padding counted in the denominator.
    """
    ref_acts = torch.randn(2, 1, 3, 2)
    diff = torch.tensor(
        [[[[3.0, 4.0], [0.0, 1.0], [70.0, 1.0]]], [[[6.0, 8.0], [0.0, 0.0], [2.0, 9.0]]]]
    )
    mask = torch.tensor([[1, 1, 0]])
    _close(representation_l2_loss(ref_acts + diff, ref_acts, mask), 4.0)
    as_list = list(ref_acts + diff)
    _close(representation_l2_loss(as_list, list(ref_acts), mask), 4.0)


def test_representation_l2_gradient_at_zero_distance_is_zero_not_nan():
    ref_acts = torch.randn(2, 2, 3, 4)
    acts = ref_acts.clone().requires_grad_(True)
    loss = representation_l2_loss(acts, ref_acts, torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert acts.grad is not None
    assert torch.equal(acts.grad, torch.zeros_like(acts))


def test_representation_l2_matches_reference_without_padding():
    """Without padding the reference's mean over all B*S positions is the same quantity."""
    acts, ref_acts = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    expected = torch.stack(
        [(h - h0).norm(dim=-1).mean() for h, h0 in zip(acts, ref_acts, strict=True)]
    ).mean()
    _close(representation_l2_loss(acts, ref_acts, torch.ones(2, 4)), expected.item())


def test_layer_count_mismatch_raises():
    acts = torch.randn(2, 1, 3, 4)
    with pytest.raises(ValueError, match="number of layers"):
        representation_l2_loss(list(acts), list(acts[:1]), torch.ones(1, 3))
    with pytest.raises(TypeCheckError):  # stacked tensors: the shape check already catches it
        representation_l2_loss(acts, acts[:1], torch.ones(1, 3))
    with pytest.raises(ValueError, match="number of layers"):
        activation_mse_loss([], [], torch.ones(1, 3))


def test_logit_kl_identical_is_zero():
    logits = torch.randn(2, 3, 6)
    _close(logit_kl_loss(logits, logits.clone(), torch.ones(2, 3)), 0.0, atol=1e-6, rtol=0)


def test_logit_kl_hand_value():
    """V = 2. Position 0: p_ref = [1/2, 1/2], p_theta = [1/4, 3/4]:

    KL = (1/2) log((1/2)/(1/4)) + (1/2) log((1/2)/(3/4)) = (1/2) log(4/3).
    Position 1 identical (KL 0), position 2 padding with garbage. Mean: (1/4) log(4/3).
    """
    logits = torch.tensor([[[0.0, LN3], [1.0, 2.0], [30.0, -30.0]]])
    ref_logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [-30.0, 30.0]]])
    mask = torch.tensor([[True, True, False]])
    _close(logit_kl_loss(logits, ref_logits, mask), 0.25 * math.log(4 / 3))


def test_logit_kl_matches_per_token_kl_div():
    logits, ref_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_token = [
        F.kl_div(logits[b, s].log_softmax(-1), ref_logits[b, s].softmax(-1), reduction="sum")
        for b in range(2)
        for s in range(3)
        if mask[b, s]
    ]
    _close(logit_kl_loss(logits, ref_logits, mask), torch.stack(per_token).mean().item())


# ----------------------------------------------------------------------------------------------
# Circuit breakers, activation MSE


def test_circuit_breaker_hand_value():
    """h0 = [1, 0] everywhere, one layer. cos with h = [1, 0], [0, 1], [-1, 0], [1, 1]:

    1, 0, -1 -> ReLU 0, 1/sqrt 2. Mean over 4 positions: (1 + 1/sqrt 2) / 4. Position 5 is padding.
    """
    acts = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [5.0, 0.1]]]])
    ref_acts = torch.tensor([1.0, 0.0]).expand(1, 1, 5, 2)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    _close(circuit_breaker_loss(acts, ref_acts, mask), (1 + 2**-0.5) / 4)


def test_circuit_breaker_gradient_at_the_original_weights_comes_from_the_jitter():
    """At h = h0 the cosine is at its maximum 1: without jitter the gradient is exactly 0 (what made
    the first steps follow floating-point noise). With jitter j the reference is
    r = h0 + j‖h0‖z/√d; the gradient is nonzero, the same for the same seed, and the loss is
    1 − O(j²): E[1 − cos] ≈ j²/2 (here j = 0.01, d = 64, so about 5e-5)."""
    torch.manual_seed(0)
    h0 = torch.randn(2, 3, 5, 64)
    mask = torch.ones(3, 5)

    def grad(jitter: float, seed: int) -> tuple[float, torch.Tensor]:
        acts = h0.clone().requires_grad_(True)
        torch.manual_seed(seed)
        loss = circuit_breaker_loss(acts, h0, mask, ref_jitter=jitter)
        loss.backward()
        assert acts.grad is not None
        return loss.item(), acts.grad

    loss, plain = grad(0.0, 0)
    assert loss == pytest.approx(1.0, abs=1e-6)
    assert plain.abs().max() < 1e-7
    # Seeds other than the one h0 was drawn with (the same seed would draw z = h0: no jitter).
    loss, first = grad(0.01, 1)
    _, again = grad(0.01, 1)
    _, other = grad(0.01, 2)
    assert 1 - loss == pytest.approx(0.5 * 0.01**2, rel=0.3)
    assert first.norm() > 1e3 * plain.norm() and torch.equal(first, again)
    assert not torch.allclose(first, other)
    # d cos(h, r)/dh at h = h0 is r's part orthogonal to h0 over ‖h0‖²: along z⊥ at every token.
    torch.manual_seed(1)
    z = torch.randn_like(h0)
    unit = h0 / h0.norm(dim=-1, keepdim=True)
    z_perp = z - (z * unit).sum(-1, keepdim=True) * unit
    assert (F.cosine_similarity(first, z_perp, dim=-1) > 0.999).all()


def test_circuit_breaker_empty_mask_is_zero_with_zero_gradient():
    acts = torch.randn(2, 2, 3, 4, requires_grad=True)
    loss = circuit_breaker_loss(acts, torch.randn(2, 2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert acts.grad is not None
    assert torch.equal(acts.grad, torch.zeros_like(acts))


def test_activation_mse_hand_value():
    """Layer 0: t - h = [1, 3] -> mean_d 5, [2, 0] -> 2: mean 3.5.

    Layer 1: [0, 0] -> 0, [2, 2] -> 4: mean 2. Average over layers 2.75.
    Position 2 is padding (garbage).
    """
    acts = torch.randn(2, 1, 3, 2)
    diff = torch.tensor(
        [[[[1.0, 3.0], [2.0, 0.0], [9.0, 9.0]]], [[[0.0, 0.0], [2.0, 2.0], [-7.0, 8.0]]]]
    )
    mask = torch.tensor([[True, True, False]])
    _close(activation_mse_loss(acts, acts + diff, mask), 2.75)
    _close(activation_mse_loss(list(acts), list(acts + diff), mask), 2.75)


# ----------------------------------------------------------------------------------------------
# Orthogonality loss (reference for the Triton kernel)


def _orthogonality_loop(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ALGORITHMS.md 3.1 written with Python loops over layers, sequences and pairs."""
    num_layers, batch_size = acts.shape[:2]
    weights = mask.to(acts.dtype)
    lengths = weights.sum(-1)
    total = acts.new_zeros(())
    for layer in range(num_layers):
        units = []
        for b in range(batch_size):
            pooled = (acts[layer, b] * weights[b, :, None]).sum(0) / max(1.0, lengths[b].item())
            units.append(pooled / (pooled.norm() + 1e-8))
        for b in range(batch_size):
            for other in range(batch_size):
                if b != other:
                    total = total + torch.relu(units[b] @ units[other])
    return total / (batch_size * (batch_size - 1) * num_layers) * lengths.mean()


def test_orthogonality_single_sequence_is_zero_with_zero_gradient():
    acts = torch.randn(2, 1, 3, 4, requires_grad=True)
    loss = orthogonality_loss(acts, torch.ones(1, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert acts.grad is not None
    assert torch.equal(acts.grad, torch.zeros_like(acts))


def test_orthogonality_of_orthogonal_pooled_vectors_is_zero():
    """Sequence 0 is e1 at every real position, sequence 1 is e2: overlap 0."""
    acts = torch.zeros(1, 2, 3, 3)
    acts[0, 0, :, 0] = 2.0
    acts[0, 1, :2, 1] = 5.0
    acts[0, 1, 2] = torch.tensor([9.0, 9.0, 9.0])  # padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    _close(orthogonality_loss(acts, mask), 0.0)


def test_orthogonality_of_identical_pooled_vectors_closed_form():
    """B = 3 sequences of real lengths 2, 3, 1 (padding beyond), all pooling to p = [3, 4]:

    seq 0: mean([2, 4], [4, 4]) = [3, 4]. Every p^_b . p^_b' = (5 / (5 + 1e-8))^2, over all 6
    ordered pairs and 1 layer, so L = (5 / (5 + 1e-8))^2 * mean length = (5 / (5 + 1e-8))^2 * 2.
    """
    acts = torch.full((1, 3, 3, 2), 100.0, dtype=torch.float64)
    acts[0, 0, :2] = torch.tensor([[2.0, 4.0], [4.0, 4.0]], dtype=torch.float64)
    acts[0, 1, :] = torch.tensor([3.0, 4.0], dtype=torch.float64)
    acts[0, 2, 0] = torch.tensor([3.0, 4.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    _close(orthogonality_loss(acts, mask), (5 / (5 + 1e-8)) ** 2 * 2)


def test_orthogonality_hand_value_with_negative_pair_and_empty_sequence():
    """One layer, B = 4, d_model = 2, one real position each except sequence 3 (fully padded):

    p^ = [1, 0], [1, 1]/sqrt 2, [-1, 0], 0. Positive overlaps: (0, 1) and (1, 0) = 1/sqrt 2 each;
    (1, 2) = -1/sqrt 2 and (0, 2) = -1 are cut by ReLU; pairs with the empty sequence give ReLU(0).
    L = 2/sqrt 2 / (4 * 3) * mean length (3/4) = sqrt 2 / 16.
    """
    acts = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]], [[-3.0, 0.0]], [[7.0, 7.0]]]])
    mask = torch.tensor([[True], [True], [True], [False]])
    _close(orthogonality_loss(acts, mask), 2**0.5 / 16, rtol=1e-6, atol=1e-7)


def test_orthogonality_matches_loop_reference():
    acts = torch.randn(3, 4, 5, 6) + 0.5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    _close(orthogonality_loss(acts, mask), _orthogonality_loop(acts, mask).item())


def test_orthogonality_gradcheck_float64():
    """Inputs with overlaps away from the ReLU kink at 0, so finite differences are valid."""
    acts = (torch.randn(2, 3, 3, 4, dtype=torch.float64) + 0.3).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    pooled = (acts * mask[None, :, :, None]).sum(2)
    unit = pooled / pooled.norm(dim=-1, keepdim=True)
    assert (unit @ unit.transpose(1, 2)).abs().min() > 1e-3
    assert torch.autograd.gradcheck(lambda a: losses.orthogonality_loss(a, mask), (acts,))


# ----------------------------------------------------------------------------------------------
# Shared properties: padding invariance, empty masks, float masks, shape checks

B, S, PAD, V, D, L = 2, 4, 3, 6, 5, 2

LOSS_CASES = {
    "max_entropy": lambda x, m: max_entropy_loss(x["logits"], m),
    "random_target_ce": lambda x, m: random_target_ce_loss(x["logits"], m, _generator(3)),
    "top_k_entropy": lambda x, m: top_k_entropy_loss(x["logits"], m, k=3),
    "next_token_nll": lambda x, m: next_token_nll_loss(x["logits"], x["tokens"], m),
    "ce_maximization": lambda x, m: ce_maximization_loss(x["logits"], x["tokens"], m),
    "npo": lambda x, m: npo_loss(
        next_token_logprobs(x["logits"], x["tokens"], m),
        next_token_logprobs(x["ref_logits"], x["tokens"], m),
        next_token_mask(m),
    ),
    "npo_token": lambda x, m: npo_loss(
        next_token_logprobs(x["logits"], x["tokens"], m),
        next_token_logprobs(x["ref_logits"], x["tokens"], m),
        next_token_mask(m),
        reduction="token",
    ),
    "representation_l2": lambda x, m: representation_l2_loss(x["acts"], x["ref_acts"], m),
    "logit_kl": lambda x, m: logit_kl_loss(x["logits"], x["ref_logits"], m),
    "circuit_breaker": lambda x, m: circuit_breaker_loss(x["acts"], x["ref_acts"], m),
    "orthogonality": lambda x, m: orthogonality_loss(x["acts"], m),
    "activation_mse": lambda x, m: activation_mse_loss(x["acts"], x["ref_acts"], m),
}
MEAN_LOSSES = sorted(set(LOSS_CASES) - {"circuit_breaker", "orthogonality"})


def _inputs(pos: int) -> dict[str, torch.Tensor]:
    return {
        "logits": torch.randn(B, pos, V),
        "ref_logits": torch.randn(B, pos, V),
        "tokens": torch.randint(V, (B, pos)),
        "acts": torch.randn(L, B, pos, D),
        "ref_acts": torch.randn(L, B, pos, D),
    }


def _append_padding(value: torch.Tensor) -> torch.Tensor:
    """Append PAD garbage positions along pos (axis 2 of [layer batch pos d_model], else 1)."""
    pos_axis = 2 if value.ndim == 4 else 1
    shape = list(value.shape)
    shape[pos_axis] = PAD
    garbage = torch.randint(V, shape) if value.dtype == torch.long else 50 * torch.randn(shape)
    return torch.cat([value, garbage], dim=pos_axis)


@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_padding_positions_do_not_change_the_loss(name):
    """Append PAD positions holding large garbage values (mask 0): the loss is unchanged."""
    loss_fn = LOSS_CASES[name]
    inputs = _inputs(S)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    padded = {key: _append_padding(value) for key, value in inputs.items()}
    padded_mask = torch.cat([mask, torch.zeros(B, PAD, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(loss_fn(padded, padded_mask), loss_fn(inputs, mask))


@pytest.mark.parametrize("name", MEAN_LOSSES)
def test_empty_mask_raises(name):
    with pytest.raises(ValueError, match="selects no position"):
        LOSS_CASES[name](_inputs(S), torch.zeros(B, S, dtype=torch.bool))


@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_bool_int_and_float_masks_agree(name):
    inputs = _inputs(S)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = LOSS_CASES[name](inputs, mask.bool())
    torch.testing.assert_close(LOSS_CASES[name](inputs, mask), expected)
    torch.testing.assert_close(LOSS_CASES[name](inputs, mask.float()), expected)


def test_shape_annotations_are_checked():
    """A mask whose pos does not match the logits is rejected by the runtime shape check."""
    with pytest.raises(TypeCheckError):
        max_entropy_loss(torch.randn(2, 3, 5), torch.ones(2, 4, dtype=torch.bool))
