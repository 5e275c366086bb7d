"""The fused orthogonality loss (`unlearn.kernels`) against the PyTorch reference.

The Triton checks run on CPU under Triton's interpreter, which must be switched on
(`TRITON_INTERPRET=1`) before triton is first imported. So that the setting cannot leak into any
other test, they run once in a subprocess (this file run as a script, `_CHECKS` below), which
reports one result per check; each check is then its own pytest test. Shapes are tiny because the
interpreter is about 10^4 times slower than torch.

If triton is missing, these tests fail (not skip) and say how to install it.
"""

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from unlearn.kernels import orthogonality_loss_fused, triton_available
from unlearn.losses import orthogonality_loss

INSTALL_HINT = "triton is not installed: run `pip install -e .[triton]` to test the fused kernels"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _loss_and_grad(acts, mask, backend):
    acts = acts.detach().clone().requires_grad_(True)
    if backend == "reference":
        loss = orthogonality_loss(acts, mask)
    else:
        loss = orthogonality_loss_fused(acts, mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, acts)
    return loss.detach(), grad


def _assert_matches_reference(acts, mask, rtol=1e-5, atol=1e-6):
    loss, grad = _loss_and_grad(acts, mask, "triton")
    ref_loss, ref_grad = _loss_and_grad(acts, mask, "reference")
    assert loss.dtype == ref_loss.dtype and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)
    return loss, grad


# Checks run in the interpreter subprocess. Each is a plain function that raises on failure.


def _check_forward_backward_match_reference():
    """L=2, B=3, S=5, d=8 fp32 with a random partial mask: loss and gradient equal the reference."""
    acts = torch.randn(2, 3, 5, 8)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    loss, _ = _assert_matches_reference(acts, mask)
    assert loss > 0


def _check_gradcheck_fp64():
    acts = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.autograd.gradcheck(
        lambda x: orthogonality_loss_fused(x, mask, backend="triton"), (acts,)
    )


def _check_fp64_matches_reference_tightly():
    acts = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    mask = torch.rand(4, 5) > 0.4
    _assert_matches_reference(acts, mask, rtol=1e-12, atol=1e-14)


def _check_fully_masked_sequence():
    """A sequence with no masked token pools to zero: zero gradient there, still counts in B.

    A shared offset makes the other two sequences' cosine positive, so they do get a gradient.
    """
    acts = torch.randn(2, 3, 5, 8) + 2.0
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    _, grad = _assert_matches_reference(acts, mask)
    assert torch.all(grad[:, 1] == 0)
    assert torch.all(grad[:, [0, 2]].abs().sum(-1) > 0)


def _check_all_empty_mask_gives_zero():
    acts = torch.randn(2, 3, 5, 8)
    loss, grad = _assert_matches_reference(acts, torch.zeros(3, 5))
    assert loss == 0 and torch.all(grad == 0)


def _check_batch_of_one_gives_zero():
    acts = torch.randn(2, 1, 5, 8)
    loss, grad = _assert_matches_reference(acts, torch.ones(1, 5))
    assert loss == 0 and torch.all(grad == 0)


def _check_all_zero_activations():
    acts = torch.zeros(2, 3, 5, 8)
    loss, grad = _assert_matches_reference(acts, torch.ones(3, 5))
    assert loss == 0 and torch.all(torch.isfinite(grad))


def _check_one_layer_and_several():
    for num_layers in (1, 3):
        acts = torch.randn(num_layers, 3, 5, 8)
        _assert_matches_reference(acts, torch.rand(3, 5) > 0.3)


def _check_padded_positions_are_ignored():
    """Huge (finite) values at unmasked positions change neither the loss nor the gradient."""
    acts = torch.randn(2, 3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    loss, grad = _loss_and_grad(acts, mask, "triton")
    acts[:, :, 3:] = 1e6
    loss_padded, grad_padded = _loss_and_grad(acts, mask, "triton")
    torch.testing.assert_close(loss_padded, loss)
    torch.testing.assert_close(grad_padded, grad)
    assert torch.all(grad[:, :, 3:] == 0)


def _check_mask_dtypes():
    acts = torch.randn(2, 3, 5, 8)
    mask = torch.rand(3, 5) > 0.3
    for typed_mask in (mask, mask.long(), mask.float(), torch.rand(3, 5)):
        _assert_matches_reference(acts, typed_mask)


def _check_multiple_blocks_and_strides():
    """S and d larger than one block and not multiples of it; a non-contiguous activation view."""
    acts = torch.randn(3, 37, 2, 130).transpose(1, 2)  # [layer batch pos d_model], strided
    assert not acts.is_contiguous()
    mask = torch.rand(2, 37) > 0.5
    _assert_matches_reference(acts, mask)


def _check_bf16_accumulates_in_fp32():
    """bf16 in, bf16 loss and gradient out, close to the fp32 reference (fp32 accumulation)."""
    acts = torch.randn(2, 3, 5, 8)
    mask = torch.rand(3, 5) > 0.3
    loss, grad = _loss_and_grad(acts.bfloat16(), mask, "triton")
    ref_loss, ref_grad = _loss_and_grad(acts, mask, "reference")
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), ref_loss, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2e-2, atol=1e-3)


_CHECKS: dict[str, Callable[[], None]] = {
    name.removeprefix("_check_"): fn for name, fn in globals().items() if name.startswith("_check_")
}


def _run_checks() -> dict[str, str]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = {}
    for name, check in _CHECKS.items():
        torch.manual_seed(0)
        try:
            check()
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_cuda(dtype):
    """Compiled kernels on a GPU: a shape with several blocks in every grid dimension."""
    acts = torch.randn(3, 5, 300, 1000, device="cuda")
    mask = torch.rand(5, 300, device="cuda") > 0.3
    mask[2] = False
    loss, grad = _loss_and_grad(acts.to(dtype), mask, "auto")
    ref_loss, ref_grad = _loss_and_grad(acts.double(), mask, "reference")
    assert loss.dtype == dtype and grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * 1e-2)


def test_auto_on_cpu_is_the_reference():
    acts = torch.randn(2, 3, 5, 8, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    fused = orthogonality_loss_fused(acts, mask)
    assert torch.equal(fused, orthogonality_loss(acts, mask))
    assert torch.equal(orthogonality_loss_fused(acts, mask, backend="torch"), fused)


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
