"""The fused orthogonality loss (`unlearn.kernels`) against an independent loop over the math.

Both backends of `orthogonality_loss_fused`, the Triton kernels and the PyTorch fallback, are
checked, loss and gradient wrt the activations, against `_loop_loss`: ALGORITHMS.md section 3.1
written out in plain PyTorch with Python loops over layers, sequences and ordered pairs (autograd
through the loop gives its gradient). The loop itself is checked against a hand-worked example.
Neither backend is ever compared with the other.

The Triton checks run on CPU under Triton's interpreter, which must be switched on
(`TRITON_INTERPRET=1`) before triton is first imported. So that the setting cannot leak into any
other test, they run once in a subprocess (this file run as a script, `_CHECKS` below, with backend
"triton"), which reports one result per check; each check is then its own pytest test. The same
checks run in-process with backend "torch". Shapes are tiny because the interpreter is about 10^4
times slower than torch.

If triton is missing, these tests fail (not skip) and say how to install it.
"""

import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from unlearn.kernels import orthogonality_loss_fused, triton_available

INSTALL_HINT = "triton is not installed: run `pip install -e .[triton]` to test the fused kernels"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _loop_loss(acts, mask):
    """L = sum_l sum_{b != b'} ReLU(p^_b . p^_b') / (B (B - 1) |L|) * mean_b sum_s m_bs, in fp64.

    p_b = sum_s m_bs h_bs / max(1, sum_s m_bs) and p^_b = p_b / (||p_b|| + 1e-8), per layer; the
    pair count is clamped to at least 1 (a batch of one has no pair and gives 0).
    """
    num_layers, batch_size = acts.shape[0], acts.shape[1]
    m = mask.double()
    counts = [float(m[b].sum()) for b in range(batch_size)]
    # unbind (not indexing) so that the backward of each slice does not allocate a full gradient
    h = acts.double()
    pair_sum = 0.0 * h.sum()  # tied to acts: a batch of one (no pair) gets a zero gradient
    for layer_acts in h.unbind(0):
        units = []
        for b, seq_acts in enumerate(layer_acts.unbind(0)):
            pooled = sum(m_bs * h_bs for m_bs, h_bs in zip(m[b], seq_acts.unbind(0), strict=True))
            pooled = pooled / max(1.0, counts[b])
            units.append(pooled / (torch.linalg.vector_norm(pooled) + 1e-8))
        for b in range(batch_size):
            for other in range(batch_size):
                if other != b:
                    pair_sum = pair_sum + torch.relu(torch.dot(units[b], units[other]))
    num_pairs = max(1, batch_size * (batch_size - 1))
    mean_count = sum(counts) / batch_size
    return pair_sum / (num_pairs * num_layers) * mean_count


def _loss_and_grad(acts, mask, backend):
    """Loss and d loss / d acts; backend "loop" is `_loop_loss`, else the fused loss's backend."""
    acts = acts.detach().clone().requires_grad_(True)
    if backend == "loop":
        loss = _loop_loss(acts, mask)
    else:
        loss = orthogonality_loss_fused(acts, mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, acts)
    return loss.detach(), grad


def _assert_matches_loop(acts, mask, backend, rtol=1e-5, atol=1e-6):
    """The backend's loss (in the input dtype) and gradient equal the loop's."""
    loss, grad = _loss_and_grad(acts, mask, backend)
    loop_loss, loop_grad = _loss_and_grad(acts, mask, "loop")
    assert loss.dtype == acts.dtype and loss.shape == ()
    torch.testing.assert_close(loss.double(), loop_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, loop_grad, rtol=rtol, atol=atol)
    return loss, grad


# The hand-worked example: one layer, two sequences of two tokens, d_model 2.
HAND_ACTS = torch.tensor([[[[1.0, 0.0], [3.0, 4.0]], [[0.0, 2.0], [100.0, -100.0]]]])
HAND_MASK = torch.tensor([[1, 1], [1, 0]])
_EPS = 1e-8
HAND_LOSS = 1.5 * 4.0 / ((2 * math.sqrt(2) + _EPS) * (2 + _EPS))
HAND_GRAD = torch.tensor(
    [[[[-1.0, 1.0], [-1.0, 1.0]], [[4.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64
) * (3 / (16 * math.sqrt(2)))


def _hand_example_holds(loss, grad):
    """Raise unless (loss, grad) are the hand-derived values.

    Sequence 0 pools both tokens: p_0 = ((1, 0) + (3, 4)) / 2 = (2, 2), ||p_0|| = 2 sqrt2,
    p^_0 = (1, 1) / sqrt2. Sequence 1 pools only its first token (the (100, -100) is padding):
    p_1 = (0, 2), p^_1 = (0, 1). Overlap p^_0 . p^_1 = 1/sqrt2 (positive, so ReLU keeps it), counted
    for both ordered pairs: 2/sqrt2, divided by B (B - 1) |L| = 2: 1/sqrt2, times the mean number of
    masked tokens (2 + 1) / 2 = 3/2: L = 3 / (2 sqrt2) ~ 1.0607 (exactly 1.5 * 4 / ((2 sqrt2 + 1e-8)
    (2 + 1e-8)) with the eps).

    Gradient: d(p^_0 . p^_1)/dp_0 = (I - p^_0 p^_0^T) p^_1 / ||p_0|| = (-1/2, 1/2) / (2 sqrt2), so
    dL/dp_0 = 3/2 of that = 3 (-1, 1) / (8 sqrt2), and each of sequence 0's two tokens gets half:
    3 (-1, 1) / (16 sqrt2) ~ (-0.1326, 0.1326). Likewise d(p^_0 . p^_1)/dp_1 = (I - p^_1 p^_1^T)
    p^_0 / ||p_1|| = (1/sqrt2, 0) / 2, so dL/dp_1 = 3 (1, 0) / (4 sqrt2) ~ (0.5303, 0), all of it on
    sequence 1's first token; its padded token gets 0.
    """
    torch.testing.assert_close(loss.double(), torch.tensor(HAND_LOSS, dtype=torch.float64))
    torch.testing.assert_close(grad.double(), HAND_GRAD, rtol=1e-6, atol=1e-7)


def test_loop_reproduces_the_hand_worked_example():
    loss, grad = _loss_and_grad(HAND_ACTS.double(), HAND_MASK, "loop")
    _hand_example_holds(loss, grad)
    assert loss == pytest.approx(3 / (2 * math.sqrt(2)), rel=1e-7)


# Checks, each a plain function of the backend that raises on failure. They run with backend
# "triton" in the interpreter subprocess and with backend "torch" in-process.


def _check_hand_worked_example(backend):
    """The loss and gradient derived by hand in `_hand_example_holds`, in fp32 and fp64."""
    for dtype in (torch.float32, torch.float64):
        loss, grad = _loss_and_grad(HAND_ACTS.to(dtype), HAND_MASK, backend)
        assert loss.dtype == dtype
        _hand_example_holds(loss, grad)


def _check_forward_backward_match_loop(backend):
    """L=2, B=3, S=5, d=8 fp32 with a random partial mask: loss and gradient equal the loop's."""
    acts = torch.randn(2, 3, 5, 8)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    loss, _ = _assert_matches_loop(acts, mask, backend)
    assert loss > 0


def _check_gradcheck_fp64(backend):
    acts = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.autograd.gradcheck(
        lambda x: orthogonality_loss_fused(x, mask, backend=backend), (acts,)
    )


def _check_fp64_matches_loop_tightly(backend):
    acts = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    mask = torch.rand(4, 5) > 0.4
    _assert_matches_loop(acts, mask, backend, rtol=1e-12, atol=1e-14)


def _check_fully_masked_sequence(backend):
    """A sequence with no masked token pools to zero: zero gradient there, still counts in B.

    A shared offset makes the other two sequences' cosine positive, so they do get a gradient.
    """
    acts = torch.randn(2, 3, 5, 8) + 2.0
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    _, grad = _assert_matches_loop(acts, mask, backend)
    assert torch.all(grad[:, 1] == 0)
    assert torch.all(grad[:, [0, 2]].abs().sum(-1) > 0)


def _check_all_empty_mask_gives_zero(backend):
    acts = torch.randn(2, 3, 5, 8)
    loss, grad = _assert_matches_loop(acts, torch.zeros(3, 5), backend)
    assert loss == 0 and torch.all(grad == 0)


def _check_batch_of_one_gives_zero(backend):
    acts = torch.randn(2, 1, 5, 8)
    loss, grad = _assert_matches_loop(acts, torch.ones(1, 5), backend)
    assert loss == 0 and torch.all(grad == 0)


def _check_all_zero_activations(backend):
    acts = torch.zeros(2, 3, 5, 8)
    loss, grad = _assert_matches_loop(acts, torch.ones(3, 5), backend)
    assert loss == 0 and torch.all(torch.isfinite(grad))


def _check_one_layer_and_several(backend):
    for num_layers in (1, 3):
        acts = torch.randn(num_layers, 3, 5, 8)
        _assert_matches_loop(acts, torch.rand(3, 5) > 0.3, backend)


def _check_padded_positions_are_ignored(backend):
    """Huge (finite) values at unmasked positions change neither the loss nor the gradient."""
    acts = torch.randn(2, 3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    loss, grad = _loss_and_grad(acts, mask, backend)
    acts[:, :, 3:] = 1e6
    loss_padded, grad_padded = _loss_and_grad(acts, mask, backend)
    torch.testing.assert_close(loss_padded, loss)
    torch.testing.assert_close(grad_padded, grad)
    assert torch.all(grad[:, :, 3:] == 0)


def _check_mask_dtypes(backend):
    """Bool, int and float 0/1 masks, and a soft float mask (weights in [0, 1))."""
    acts = torch.randn(2, 3, 5, 8)
    mask = torch.rand(3, 5) > 0.3
    for typed_mask in (mask, mask.long(), mask.float(), torch.rand(3, 5)):
        _assert_matches_loop(acts, typed_mask, backend)


def _check_multiple_blocks_and_strides(backend):
    """S and d larger than one block and not multiples of it; a non-contiguous activation view."""
    acts = torch.randn(3, 37, 2, 130).transpose(1, 2)  # [layer batch pos d_model], strided
    assert not acts.is_contiguous()
    mask = torch.rand(2, 37) > 0.5
    _assert_matches_loop(acts, mask, backend)


def _check_bf16_close_to_fp32_loop(backend):
    """bf16 in, bf16 loss and gradient out, close to the loop on the same values in fp32.

    Triton accumulates in fp32; the torch fallback works in bf16, hence its looser tolerance.
    """
    acts = torch.randn(2, 3, 5, 8).bfloat16()
    mask = torch.rand(3, 5) > 0.3
    loss, grad = _loss_and_grad(acts, mask, backend)
    loop_loss, loop_grad = _loss_and_grad(acts.float(), mask, "loop")
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    tol = 2e-2 if backend == "triton" else 5e-2
    torch.testing.assert_close(loss.double(), loop_loss, rtol=tol, atol=1e-3)
    torch.testing.assert_close(grad.float(), loop_grad, rtol=tol, atol=1e-3)


_CHECKS: dict[str, Callable[[str], None]] = {
    name.removeprefix("_check_"): fn for name, fn in globals().items() if name.startswith("_check_")
}


def _run_checks() -> dict[str, str]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = {}
    for name, check in _CHECKS.items():
        torch.manual_seed(0)
        try:
            check("triton")
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    return results


def _run_script(code: str, env_update: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = {**os.environ}
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    if not triton_available():
        pytest.fail(INSTALL_HINT)
    code = (
        "import json, torch; torch.set_num_threads(1); "
        "from tests.unlearn.test_orth_kernel import _run_checks; "
        "print('RESULTS' + json.dumps(_run_checks()))"
    )
    proc = _run_script(code, {"TRITON_INTERPRET": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, f"interpreter subprocess failed:\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("RESULTS"))


def test_triton_is_installed():
    assert triton_available(), INSTALL_HINT


@pytest.mark.parametrize("check", sorted(_CHECKS))
def test_triton_kernel_under_interpreter(interpreter_results, check):
    assert interpreter_results[check] == "ok", interpreter_results[check]


@pytest.mark.parametrize("check", sorted(_CHECKS))
def test_torch_fallback(check):
    _CHECKS[check]("torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_cuda(dtype):
    """Compiled kernels on a GPU against the loop: several blocks in every grid dimension."""
    acts = torch.randn(3, 5, 300, 1000, device="cuda")
    mask = torch.rand(5, 300, device="cuda") > 0.3
    mask[2] = False
    loss, grad = _loss_and_grad(acts.to(dtype), mask, "auto")
    loop_loss, loop_grad = _loss_and_grad(acts, mask, "loop")
    assert loss.dtype == dtype and grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), loop_loss, rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(grad.float(), loop_grad, rtol=tol, atol=tol * 1e-2)


def test_auto_on_cpu_dispatches_to_the_torch_fallback():
    acts = torch.randn(2, 3, 5, 8, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    fused = orthogonality_loss_fused(acts, mask)
    assert torch.equal(fused, orthogonality_loss_fused(acts, mask, backend="torch"))


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        orthogonality_loss_fused(torch.randn(1, 2, 3, 4), torch.ones(2, 3), backend="cuda")  # type: ignore[arg-type]


def test_forcing_triton_on_cpu_without_interpreter_raises():
    if not triton_available():
        pytest.fail(INSTALL_HINT)
    code = (
        "import torch; from unlearn.kernels import orthogonality_loss_fused\n"
        "acts, mask = torch.randn(1, 2, 3, 4), torch.ones(2, 3)\n"
        "try:\n"
        "    orthogonality_loss_fused(acts, mask, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    assert 'TRITON_INTERPRET=1' in str(error), error\n"
        "    print('RAISED')\n"
    )
    proc = _run_script(code, {"TRITON_INTERPRET": None})
    assert "RAISED" in proc.stdout, proc.stderr


def test_unlearn_imports_and_runs_without_triton():
    """With triton blocked, the package and the circuit-breakers method import, auto falls back to
    the reference, and forcing triton says how to install it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, unlearn, unlearn.kernels, unlearn.methods.circuit_breakers\n"
        "from unlearn.kernels import orthogonality_loss_fused\n"
        "acts, mask = torch.randn(1, 2, 3, 4), torch.ones(2, 3)\n"
        "orthogonality_loss_fused(acts, mask)\n"
        "try:\n"
        "    orthogonality_loss_fused(acts, mask, backend='triton')\n"
        "except ImportError as error:\n"
        "    assert 'pip install -e .[triton]' in str(error), error\n"
        "    print('RAISED')\n"
    )
    proc = _run_script(code, {})
    assert "RAISED" in proc.stdout, proc.stderr


if __name__ == "__main__":
    print(json.dumps(_run_checks(), indent=1))
