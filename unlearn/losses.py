"""Loss terms for unlearning: pure functions from tensors to a scalar loss tensor.

Every function here takes activations, logits or per-token log-probabilities that a method has
already read from its models, and returns a 0-dim tensor. Nothing here runs a model, registers a
hook or keeps state; a method composes these terms and weights them with its schedules. For example,
the forget and retain terms of circuit breakers (`ALGORITHMS.md` section 3.1)::

    forget = circuit_breaker_loss(acts, ref_acts, forget_mask)
    retain = representation_l2_loss(retain_acts, retain_ref_acts, retain_mask)
    orth = orthogonality_loss(acts, forget_mask)

Conventions shared by every function:

- **Masks** (`TokenMask`) are `[batch pos]`: bool, or integer/float 0/1 (a Hugging Face attention
  mask works as is). Positions where the mask is 0 (padding, or tokens a keyword mask leaves out)
  never count in a numerator or in a denominator, whatever values they hold, as long as those values
  are finite. A float mask with other values acts as non-negative per-position weights.
- **Empty masks.** A loss that is a mean over masked positions raises `ValueError` when the mask
  selects nothing, instead of returning NaN. Only `circuit_breaker_loss` and `orthogonality_loss`,
  whose reference defines a value for that case, return 0 (documented on each).
- **Next-token alignment.** Log-probabilities from `next_token_logprobs` are aligned with the tokens
  they score: entry `t` is log p(token t | tokens < t), read from the logits at position `t - 1`.
  `next_token_mask` gives the matching mask (the first token is never scored). Losses on a logit
  distribution itself (entropy, KL) score the distribution at each masked position, with no shift.
- **Layers.** Per-layer terms take a stacked `[layer batch pos d_model]` tensor or a sequence of
  `[batch pos d_model]` tensors, one per layer, and average over layers.
- **Precision.** Everything is computed in the input dtype; pass `logits.float()` when bf16
  precision over a large vocabulary is not enough.

The reference implementation is the EleutherAI "unlearn" repository, studied at its newest commit of
2026-03-18 (described in `ALGORITHMS.md`); each docstring names the reference file (a path in that
repository, not this one) and says where this version deliberately differs from it.
"""

import math
from collections.abc import Sequence
from typing import Literal

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "TokenMask",
    "LayerActs",
    "masked_mean",
    "next_token_mask",
    "next_token_logprobs",
    "max_entropy_loss",
    "random_target_ce_loss",
    "top_k_entropy_loss",
    "ce_maximization_loss",
    "next_token_nll_loss",
    "npo_loss",
    "simnpo_loss",
    "representation_l2_loss",
    "logit_kl_loss",
    "circuit_breaker_loss",
    "orthogonality_loss",
    "activation_mse_loss",
]

TokenMask = Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"] | Float[Tensor, "batch pos"]
"""Which positions count: 1/True counts, 0/False is padding or left out. Floats act as weights."""

LayerActs = Float[Tensor, "layer batch pos d_model"] | Sequence[Float[Tensor, "batch pos d_model"]]
"""Activations at several layers: one stacked tensor, or one `[batch pos d_model]` per layer."""

_NORMALIZE_EPS = 1e-8
"""Added to a pooled vector's norm before dividing (orthogonal circuit breakers)."""

_CB_DENOMINATOR_EPS = 1e-6
"""Lower bound on the circuit-breaker mask sum, so an empty mask gives 0 (the reference adds it)."""


def masked_mean(
    values: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | Int[Tensor, "*batch"] | Float[Tensor, "*batch"],
) -> Float[Tensor, ""]:
    """Mean of `values` over the positions the mask selects: sum(m * v) / sum(m).

    Unselected positions are dropped with `torch.where`, so even a non-finite value there cannot
    leak into the result (its gradient is still whatever the upstream graph makes of it).

    Args:
        values: Per-position values.
        mask: 0/1 (bool, int or float) selection, or non-negative float weights, same shape.

    Returns:
        The masked mean.

    Raises:
        ValueError: If the mask selects no position, where the mean is undefined.
    """
    weights = mask.to(values.dtype)
    total_weight = weights.sum()
    if not bool(total_weight > 0):
        raise ValueError(
            "The mask selects no position, so the masked mean is undefined. Skip this loss term "
            "for batches where `mask.any()` is False, or check the padding/keyword mask."
        )
    weighted = torch.where(weights != 0, values * weights, torch.zeros_like(values))
    return weighted.sum() / total_weight


def next_token_mask(mask: TokenMask) -> Bool[Tensor, "batch pos"]:
    """Mask of the tokens that a next-token loss scores: the selected tokens except the first.

    Token `t` is predicted by the logits at position `t - 1`, so token 0 is never scored. With left
    padding the first real token is scored from the last padding position's logits, as with Hugging
    Face labels; to drop it, pass `mask & mask.roll(1, dims=1)`, or pad training batches on the
    right, where this never arises.

    Args:
        mask: Attention or keyword mask over the tokens.

    Returns:
        Boolean mask aligned with the tokens, False in column 0.
    """
    scored = mask != 0
    scored[:, 0] = False
    return scored


def next_token_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: TokenMask,
) -> Float[Tensor, "batch pos"]:
    """Log-probability the model gives each token, aligned with the tokens; 0 where not scored.

    Entry `[b, t]` is log softmax(logits[b, t - 1])[tokens[b, t]] where `next_token_mask(mask)` is
    True, and exactly 0 elsewhere (column 0, padding). Computed as a gathered logit minus the
    log-sum-exp, so no `[batch pos d_vocab]` log-softmax is materialized in the forward pass.

    Args:
        logits: Model logits; position `t` predicts token `t + 1`.
        tokens: Token ids (the labels).
        mask: Attention or keyword mask over the tokens.

    Returns:
        Per-token target log-probabilities, to pass with `next_token_mask(mask)` to `npo_loss`.
    """
    shifted_logits = logits[:, :-1]
    targets = tokens[:, 1:, None]
    logprobs = shifted_logits.gather(-1, targets).squeeze(-1) - shifted_logits.logsumexp(-1)
    logprobs = F.pad(logprobs, (1, 0))  # back to [batch pos]: token 0 has no prediction
    return torch.where(next_token_mask(mask), logprobs, torch.zeros_like(logprobs))


def max_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    mask: TokenMask,
    *,
    normalize_by_log_vocab: bool = True,
) -> Float[Tensor, ""]:
    """Exact KL divergence from the uniform distribution to the model's prediction, masked mean.

    Per position, with V = d_vocab and p = softmax(z):

        KL(U || p) = -log V - (1/V) sum_v log p_v = logsumexp(z) - mean_v(z_v) - log V,

    which is 0 exactly when p is uniform, so minimizing it maximizes the entropy. Averaged over the
    masked positions and, by default, divided by log V.

    Reference: `unlearn/algorithm/sequential_retain.py` and `sequential_retain_sft.py`
    (`max_entropy_kl_loss`, `ALGORITHMS.md` section 3.3). The reference drops the constant -log V,
    so its normalized value is 1 + ours; the gradients are identical.

    Args:
        logits: Logits whose predicted distribution is pushed to uniform.
        mask: Positions whose prediction is scored (no next-token shift).
        normalize_by_log_vocab: Divide by log V, making the value comparable across vocabularies.

    Returns:
        Masked mean of KL(U || p), divided by log V if asked.
    """
    vocab_size = logits.shape[-1]
    kl_from_uniform = logits.logsumexp(-1) - logits.mean(-1) - math.log(vocab_size)
    loss = masked_mean(kl_from_uniform, mask)
    return loss / math.log(vocab_size) if normalize_by_log_vocab else loss


def random_target_ce_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    mask: TokenMask,
    generator: torch.Generator | None = None,
    *,
    normalize_by_log_vocab: bool = True,
) -> Float[Tensor, ""]:
    """Cross-entropy to uniformly random targets: a one-sample estimate of the max-entropy loss.

    For each masked position a target y ~ Uniform{0..V-1} is drawn and -log p_y is scored; its
    expectation is the cross-entropy H(U, p) = log V + KL(U || p). Divided by log V (default), this
    is an unbiased estimate of 1 + KL(U || p) / log V, i.e. of `max_entropy_loss` plus one. Targets
    are drawn only for masked positions, in row-major order, so appending padding leaves the draw
    unchanged.

    Reference: `unlearn/algorithm/lens_unlearn.py` (through a tuned lens, Belrose et al. 2023,
    "Eliciting Latent Predictions from Transformers with the Tuned Lens"), `sequential_retain.py`
    (default) and `probe_unlearn.py` (`ALGORITHMS.md` sections 3.2, 3.3, 3.6):
    L = CE(logits[m], y_rand) / log V.

    Args:
        logits: Logits whose predicted distribution is pushed to uniform.
        mask: Positions whose prediction is scored (no next-token shift).
        generator: A CPU generator for the random targets (None: torch's default one). Targets
            are drawn on the CPU and moved to `logits.device`, so a run draws the same targets
            on any device.
        normalize_by_log_vocab: Divide by log V.

    Returns:
        Masked mean of -log p_y over random targets y, divided by log V if asked.
    """
    vocab_size = logits.shape[-1]
    selected = mask != 0
    scored_logits = logits[selected]  # [num_selected d_vocab]
    weights = mask[selected].to(logits.dtype)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"random_target_ce_loss draws its targets on the CPU; pass a CPU generator, not one "
            f"on {generator.device}"
        )
    generator = torch.default_generator if generator is None else generator
    targets = torch.randint(vocab_size, (scored_logits.shape[0],), generator=generator)
    targets = targets.to(logits.device)
    neg_logprobs = F.cross_entropy(scored_logits, targets, reduction="none")
    loss = masked_mean(neg_logprobs, weights)
    return loss / math.log(vocab_size) if normalize_by_log_vocab else loss


def top_k_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    mask: TokenMask,
    *,
    k: int = 100,
) -> Float[Tensor, ""]:
    """Max-entropy loss restricted to the k largest logits, divided by log k.

    Per position, with z_(1..k) the k largest logits: KL(U_k || softmax(z_(1..k))) / log k, where
    KL(U_k || q) = logsumexp(z_(1..k)) - mean(z_(1..k)) - log k. It flattens the head of the
    distribution, where the knowledge sits, and ignores the long tail. Only the top-k logits receive
    gradient.

    Reference: `unlearn/algorithm/sequential_retain.py` and `sequential_retain_sft.py`
    (`top_k_entropy_loss`, k = 100, `ALGORITHMS.md` section 3.3). As in `max_entropy_loss`, the
    reference drops the constant -log k (its value is 1 + ours, same gradients).

    Args:
        logits: Logits whose top-k part is pushed to uniform.
        mask: Positions whose prediction is scored (no next-token shift).
        k: How many logits to keep. Capped at d_vocab, where this equals `max_entropy_loss`.

    Returns:
        Masked mean of the top-k KL from uniform, divided by log k.

    Raises:
        ValueError: If k < 2 (log k would be 0).
    """
    if k < 2:
        raise ValueError(f"top_k_entropy_loss needs k >= 2 to divide by log k, got k={k}.")
    k = min(k, logits.shape[-1])
    top_logits = logits.topk(k, dim=-1).values
    kl_from_uniform = top_logits.logsumexp(-1) - top_logits.mean(-1) - math.log(k)
    return masked_mean(kl_from_uniform, mask) / math.log(k)


def next_token_nll_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: TokenMask,
) -> Float[Tensor, ""]:
    """Next-token cross-entropy (negative log-likelihood), averaged over the scored tokens.

    L = -(1 / |T|) sum_{(b,t) in T} log p_theta(x_{b,t} | x_{b,<t}),

    with T = `next_token_mask(mask)`. This is the usual language-modelling loss, used as a retain
    term.

    Reference: the `nll` retain loss of `unlearn/algorithm/sequential_retain_sft.py` and
    `retain_ce_loss` of `checkpoint_transfer_unlearn.py` (`ALGORITHMS.md` sections 3.3, 3.4), which
    also exclude pads.

    Args:
        logits: Model logits; position `t` predicts token `t + 1`.
        tokens: Token ids.
        mask: Attention (or keyword) mask over the tokens.

    Returns:
        Mean negative log-likelihood of the scored tokens.
    """
    return -masked_mean(next_token_logprobs(logits, tokens, mask), next_token_mask(mask))


def ce_maximization_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: TokenMask,
) -> Float[Tensor, ""]:
    """Negative next-token cross-entropy on forget tokens (gradient ascent on the forget data).

    L = (1 / |T|) sum_{(b,t) in T} log p_theta(x_{b,t} | x_{b,<t}) = -`next_token_nll_loss`.
    Minimizing it drives the likelihood of the forget text down without bound, which is why it is
    paired with a retain term (gradient difference).

    Paper: Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language Models"
    (gradient ascent). Reference: `unlearn/algorithm/grad_diff.py` and `grad_diff_sft.py` (the
    -CE_forget term, `ALGORITHMS.md` section 3.8).

    Args:
        logits: Model logits on forget text; position `t` predicts token `t + 1`.
        tokens: Token ids of the forget text.
        mask: Attention (or keyword) mask over the tokens.

    Returns:
        Mean log-likelihood of the scored forget tokens.
    """
    return -next_token_nll_loss(logits, tokens, mask)


def npo_loss(
    logprobs: Float[Tensor, "batch pos"],
    ref_logprobs: Float[Tensor, "batch pos"],
    mask: TokenMask,
    *,
    beta: float = 0.1,
    reduction: Literal["sequence_sum", "sequence_mean", "token"] = "sequence_sum",
) -> Float[Tensor, ""]:
    """Negative Preference Optimization: a bounded, reference-anchored form of gradient ascent.

    With r = log p_theta - log p_ref per token (from `next_token_logprobs`) and T the masked tokens:

    - "sequence_sum" (the paper): L = -(2/beta) mean_b log sigmoid(-beta * sum_{t in T_b} r_bt),
      the log-ratio of whole sequences, as in Zhang et al. 2024.
    - "sequence_mean": the same with the length-normalized mean_{t in T_b} r_bt inside the sigmoid.
    - "token": every token is its own sequence,
      L = -(2/beta) mean_{(b,t) in T} log sigmoid(-beta r_bt).

    At theta = ref every variant equals (2/beta) log 2. The gradient is that of gradient ascent
    (descent on log p_theta) weighted by 2 sigmoid(beta r), which is 1 at theta = ref and vanishes
    once the forget text is unlikely enough under theta.

    Paper: Zhang, Lin, Bai and Mei 2024, "Negative Preference Optimization: From Catastrophic
    Collapse to Effective Unlearning" (the definition of L_NPO). Reference:
    `unlearn/algorithm/sequential_retain_sft.py` (`ALGORITHMS.md` section 3.3(b)), whose
    per-sequence form averages over tokens and has no 2/beta ("sequence_mean" up to that constant
    factor) and whose `dpo_per_token` form is "token". Rows with no masked token are left out of the
    mean over rows, where the reference would count them as a constant (2/beta) log 2.

    Args:
        logprobs: Per-token log-probabilities under the trained model.
        ref_logprobs: The same under the frozen reference model (computed without grad).
        mask: Tokens to score, usually `next_token_mask(mask)`.
        beta: Inverse temperature; beta -> 0 recovers gradient ascent on log p_theta.
        reduction: Where the log-ratio is summed before the sigmoid (see above).

    Returns:
        The NPO loss.

    Raises:
        ValueError: If the mask selects no token.
    """
    log_ratio = logprobs - ref_logprobs
    if reduction == "token":
        return masked_mean(-F.logsigmoid(-beta * log_ratio), mask) * (2 / beta)

    weights = mask.to(log_ratio.dtype)
    token_count = weights.sum(-1)
    has_tokens = token_count > 0
    weighted = torch.where(weights != 0, log_ratio * weights, torch.zeros_like(log_ratio))
    seq_log_ratio = weighted.sum(-1)
    if reduction == "sequence_mean":
        seq_log_ratio = seq_log_ratio / torch.where(has_tokens, token_count, 1.0)
    return masked_mean(-F.logsigmoid(-beta * seq_log_ratio), has_tokens) * (2 / beta)


def simnpo_loss(
    logprobs: Float[Tensor, "batch pos"],
    mask: TokenMask,
    *,
    beta: float = 0.1,
    gamma: float = 0.0,
) -> Float[Tensor, ""]:
    """Simple NPO: NPO without a reference model, on the length-normalized sequence likelihood.

    With l_b = (1/|T_b|) sum_{t in T_b} log p_theta(x_bt | x_b,<t), the mean token log-probability
    of row b over its masked tokens T_b (from `next_token_logprobs`):

        L = -(2/beta) mean_b log sigmoid(-beta * l_b - gamma).

    Derivation: NPO scores a forget sequence y by the reward log pi_theta(y) - log pi_ref(y);
    SimNPO replaces it by SimPO's reference-free reward, the length-normalized
    (1/|y|) log pi_theta(y), less a margin gamma/beta. Since -l_b = CE_b is row b's mean next-token
    NLL, L = -(2/beta) mean_b log sigmoid(beta CE_b - gamma): it falls as the forget NLL rises. Its
    gradient is gradient ascent on CE_b weighted by 2 sigmoid(gamma - beta CE_b), 1 at
    CE_b = gamma/beta and vanishing as the forget text becomes unlikely; the length normalization
    keeps long sequences from dominating as they do NPO's summed log-ratio. At l_b = 0 and
    gamma = 0 the value is (2/beta) log 2.

    Paper: Fan, Liu, Lin, Jia, Zhang, Mei and Liu 2024, "Simplicity Prevails: Rethinking Negative
    Preference Optimization for LLM Unlearning" (the SimNPO loss, their eq. 4). Reference:
    `unlearn/algorithm/simple_npo.py` (`ALGORITHMS.md` section 3.8), which takes the sigmoid of the
    whole batch's mean NLL (one "sequence" per batch) with gamma = 0; here it is per sequence, as in
    the paper. Rows with no masked token are left out of the mean over rows.

    Args:
        logprobs: Per-token log-probabilities under the trained model.
        mask: Tokens to score, usually `next_token_mask(mask)`.
        beta: Inverse temperature; beta -> 0 (with gamma = 0) recovers gradient ascent on the
            mean per-sequence NLL.
        gamma: Reward margin.

    Returns:
        The SimNPO loss.

    Raises:
        ValueError: If the mask selects no token.
    """
    weights = mask.to(logprobs.dtype)
    token_count = weights.sum(-1)
    has_tokens = token_count > 0
    weighted = torch.where(weights != 0, logprobs * weights, torch.zeros_like(logprobs))
    mean_logprob = weighted.sum(-1) / torch.where(has_tokens, token_count, 1.0)
    return masked_mean(-F.logsigmoid(-beta * mean_logprob - gamma), has_tokens) * (2 / beta)


def _num_layers(acts: LayerActs, ref_acts: LayerActs) -> int:
    if len(acts) == 0 or len(acts) != len(ref_acts):
        raise ValueError(
            f"Need the same, non-zero number of layers in both inputs; got {len(acts)} and "
            f"{len(ref_acts)}."
        )
    return len(acts)


def representation_l2_loss(
    acts: LayerActs,
    ref_acts: LayerActs,
    mask: TokenMask,
) -> Float[Tensor, ""]:
    """Retain term: L2 distance between trained and frozen representations, masked mean.

    L = (1/|L|) sum_l [sum_{b,s} m_bs ||h_l^theta(x)_bs - h_l^0(x)_bs||_2] / sum_{b,s} m_bs.

    The (unsquared) norm has a zero gradient, not NaN, where the two representations coincide (as at
    the first step of a LoRA run).

    Paper: the retain loss of Zou et al. 2024, "Improving Alignment and Robustness with Circuit
    Breakers" (Algorithm 1). Reference: `unlearn/algorithm/orth_circuit_breakers.py`, also used by
    `lens_unlearn.py` and `sequential_retain.py` (`ALGORITHMS.md` sections 3.1-3.3). The reference
    takes `nanmean` over all B*S positions of ||m*h^theta - m*h^0||, so padding counts as zeros in
    the denominator and the loss shrinks with the padding fraction; here padding is excluded.

    Args:
        acts: Trained-model activations at the retain layers.
        ref_acts: Frozen-model activations at the same layers (computed without grad).
        mask: Attention mask of the retain batch.

    Returns:
        The layer-averaged masked mean distance.

    Raises:
        ValueError: If the layer counts differ or are zero, or the mask is empty.
    """
    num_layers = _num_layers(acts, ref_acts)
    distances = torch.stack(
        [torch.linalg.vector_norm(h - h0, dim=-1) for h, h0 in zip(acts, ref_acts, strict=True)]
    )  # [layer batch pos]
    return masked_mean(distances.sum(0), mask) / num_layers


def logit_kl_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    ref_logits: Float[Tensor, "batch pos d_vocab"],
    mask: TokenMask,
) -> Float[Tensor, ""]:
    """Retain term: per-token KL(p_ref || p_theta) over the vocabulary, masked mean over tokens.

    L = (1/|T|) sum_{(b,s) in T} sum_v p_ref,v (log p_ref,v - log p_theta,v),

    with p = softmax(logits) at each position. It is 0 when the two models predict the same
    distribution everywhere.

    Reference: the per-token masked form is `retain_kl_loss` of
    `unlearn/algorithm/checkpoint_transfer_unlearn.py` (`ALGORITHMS.md` section 3.4). The `kl`
    retain of `lens_unlearn.py` and `sequential_retain_sft.py` uses `F.kl_div(..., "batchmean")`
    with no mask: it sums over all positions, padding included, and divides by the batch size only,
    giving retain losses in the hundreds that depend on the padded length (`ALGORITHMS.md` section
    9). That is fixed here.

    Args:
        logits: Trained-model logits.
        ref_logits: Frozen reference logits at the same positions (computed without grad).
        mask: Positions to compare (no next-token shift).

    Returns:
        Mean per-token KL divergence.
    """
    logprobs = logits.log_softmax(-1)
    ref_logprobs = ref_logits.log_softmax(-1)
    kl_per_token = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    return masked_mean(kl_per_token, mask)


def circuit_breaker_loss(
    acts: LayerActs,
    ref_acts: LayerActs,
    mask: TokenMask,
    *,
    ref_jitter: float = 0.0,
) -> Float[Tensor, ""]:
    """Forget term of circuit breakers: positive cosine similarity to the frozen representations.

    L = sum_l sum_{b,s} m_bs ReLU(cos(h_l^theta_bs, r_l,bs)) / (|L| * sum_{b,s} m_bs), with
    r = h^0 + j ‖h^0‖ z / √d, z ~ N(0, I) drawn afresh at every call (torch's generator of the
    activations' device, which the training core seeds at every micro-step), j = `ref_jitter`.

    Why the jitter: at the original weights h^theta = h^0, the cosine is at its maximum 1 and its
    gradient is exactly zero, so the first optimizer steps would follow floating-point noise (which
    differs between devices, thread counts and kernels; Adam turns any nonzero noise into full-size
    steps). With j > 0 the gradient at h^0 points away from a seeded random direction, 1 − cos
    changes by O(j²) (1e-4 at j = 0.01) and once h^theta has moved the term is the reference's.
    j = 0 is the reference exactly.

    It is 0 once every forget representation is orthogonal or opposite to the original one. Cosine
    uses `F.cosine_similarity` (eps 1e-8), so a zero vector has cosine 0. An empty mask gives
    exactly 0 with a zero gradient, following the reference's `+ 1e-6` in the denominator, because a
    keyword mask can select no token in a small forget batch; the bound is applied with `clamp_min`,
    so a non-empty mask gives the exact ratio.

    Paper: the representation-rerouting loss of Zou et al. 2024, "Improving Alignment and Robustness
    with Circuit Breakers" (Algorithm 1). Reference: `unlearn/algorithm/orth_circuit_breakers.py`,
    also `base_unlearn.py` and the fallback of `checkpoint_transfer_unlearn.py` (`ALGORITHMS.md`
    sections 3.1, 3.4).

    Args:
        acts: Trained-model activations on forget text at the target layers.
        ref_acts: Frozen-model activations at the same layers (computed without grad).
        mask: Forget tokens to reroute (attention mask, optionally AND a keyword mask).
        ref_jitter: Relative scale j of the random perturbation of the reference (0: none).

    Returns:
        The masked, layer-averaged ReLU cosine.
    """
    num_layers = _num_layers(acts, ref_acts)
    if ref_jitter:
        ref_acts = ref_acts.detach()
        noise = torch.randn_like(ref_acts) / math.sqrt(ref_acts.shape[-1])
        ref_acts = ref_acts + ref_jitter * ref_acts.norm(dim=-1, keepdim=True) * noise
    cosines = torch.stack(
        [F.cosine_similarity(h, h0, dim=-1) for h, h0 in zip(acts, ref_acts, strict=True)]
    )  # [layer batch pos]
    per_position = cosines.relu().sum(0)
    weights = mask.to(per_position.dtype)
    weighted = torch.where(weights != 0, per_position * weights, torch.zeros_like(per_position))
    return weighted.sum() / (num_layers * weights.sum().clamp_min(_CB_DENOMINATOR_EPS))


def orthogonality_loss(
    acts: Float[Tensor, "layer batch pos d_model"],
    mask: TokenMask,
) -> Float[Tensor, ""]:
    """Within-batch orthogonality of mean-pooled forget representations (orthogonal CB).

    For each layer l and sequence b, pool and normalize:

        p_b = sum_s m_bs h_l,bs / max(1, sum_s m_bs),     p^_b = p_b / (||p_b||_2 + 1e-8),

    then penalize positive overlap between different sequences of the batch:

        L = [sum_l sum_{b != b'} ReLU(p^_b . p^_b')] / (B (B - 1) |L|) * mean_b(sum_s m_bs).

    The last factor, the mean number of masked tokens per sequence, offsets the 1/length dilution of
    each token's gradient by mean-pooling. Conventions, which a fused kernel must reproduce:

    - B = 1 has no pair: the loss is exactly 0 with a zero gradient (the pair count is clamped
      to max(1, B(B-1))).
    - A sequence with no masked token pools to the zero vector, normalizes to zero, and contributes
      ReLU(0) = 0 to each of its pairs, with zero gradient (ReLU'(0) = 0 in PyTorch); it still
      counts in B and in the mean length. An all-empty mask gives 0.
    - Ordered pairs: each unordered pair is counted twice and B(B-1) counts ordered pairs.

    This is the PyTorch reference that the fused Triton kernel is tested against. No paper; the
    method is the reference repository's extension of Zou et al. 2024's circuit breakers. Reference:
    `unlearn/algorithm/orth_circuit_breakers.py` (`ALGORITHMS.md` section 3.1), reproduced exactly.

    Args:
        acts: Trained-model activations on a forget batch at the target layers.
        mask: Forget tokens to pool (attention mask, optionally AND a keyword mask).

    Returns:
        The orthogonality loss.
    """
    num_layers, batch_size = acts.shape[0], acts.shape[1]
    weights = mask.to(acts.dtype)
    token_count = weights.sum(-1)  # [batch]
    pooled = (
        einops.einsum(acts, weights, "layer batch pos d_model, batch pos -> layer batch d_model")
        / token_count.clamp_min(1.0)[None, :, None]
    )
    unit = pooled / (torch.linalg.vector_norm(pooled, dim=-1, keepdim=True) + _NORMALIZE_EPS)
    overlaps = einops.einsum(
        unit, unit, "layer batch d_model, layer other d_model -> layer batch other"
    )
    off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=acts.device)
    pair_sum = (overlaps.relu() * off_diagonal).sum()
    num_pairs = max(1, batch_size * (batch_size - 1))
    return pair_sum / (num_pairs * num_layers) * token_count.mean()


def activation_mse_loss(
    acts: LayerActs,
    target_acts: LayerActs,
    mask: TokenMask,
) -> Float[Tensor, ""]:
    """Masked mean-squared error between activations and target activations, averaged over layers.

    L = (1/|L|) sum_l [sum_{b,s} m_bs mean_d (t_l,bsd - h_l,bsd)^2] / sum_{b,s} m_bs.

    Used to pull the trained model's forget activations toward those of an early checkpoint (through
    an optional affine map the caller applies), or toward any other target.

    Paper: the masked MSE form of RMU's forget loss, Li et al. 2024, "The WMDP Benchmark: Measuring
    and Reducing Malicious Use with Unlearning". Reference: the forget term of
    `unlearn/algorithm/checkpoint_transfer_unlearn.py` (`ALGORITHMS.md` section 3.4), same math.

    Args:
        acts: Trained-model activations at the target layers.
        target_acts: Targets at the same layers (computed without grad).
        mask: Positions to compare.

    Returns:
        The layer-averaged masked MSE.

    Raises:
        ValueError: If the layer counts differ or are zero, or the mask is empty.
    """
    num_layers = _num_layers(acts, target_acts)
    squared_errors = torch.stack(
        [(t - h).square().mean(-1) for h, t in zip(acts, target_acts, strict=True)]
    )  # [layer batch pos]
    return masked_mean(squared_errors.sum(0), mask) / num_layers
