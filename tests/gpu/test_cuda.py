"""CUDA checks: every method, every unlearning recipe and the README's main command on a GPU.

Skipped without CUDA (the `gpu` marker). On a machine with one, run all of them with::

    python -m pytest -q tests/gpu tests/unlearn/test_orth_kernel.py

The CPU suite proves device placement on a stand-in device (`tests/other_device.py`); these
tests run the same paths on a real one: random-target draws, maps, lenses, probes, the teacher,
autocast in bfloat16, the Triton orthogonality kernel and the tamper attack.
"""

import copy
import json
import math

import pytest
import torch
from simple_parsing import parse

from recipes import (
    checkpoint_transfer,
    circuit_breakers,
    grad_diff,
    lens_unlearn,
    npo,
    probe_unlearn,
    rewritten_transfer,
    rmu,
    sequential,
    simnpo,
)
from tests.unlearn.test_devices import CASES, _losses, _train
from tests.unlearn.test_methods import _config
from unlearn.training import METRICS_FILE, LoraSettings, OptimSettings

pytestmark = pytest.mark.gpu

TINY = "--world_preset tiny --num_steps 3 --batch_size 4 --device cuda"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_trains_on_cuda(case, use_lora, dtype, tiny_lm, tmp_path):
    """Three steps per phase of each method on CUDA (built by `build` with the model on CUDA); in
    float32 the losses match a CPU run (random-target cross-entropy draws the same targets on
    every device; the circuit breakers' jitter is drawn by each device's own generator, so only
    its first step is compared)."""
    model, tokenizer = tiny_lm
    name = case.split("-")[0]
    cfg = _config(name, CASES[case], tmp_path, model, tokenizer)
    optim = OptimSettings(lr=1e-3, warmup_steps=1, precision=dtype)
    kwargs = dict(num_steps=3, optim=optim, lora=LoraSettings(lora_rank=4) if use_lora else None)
    results = _train(name, cfg, copy.deepcopy(model).cuda(), tokenizer, tmp_path / "gpu", **kwargs)
    assert all(p.is_cuda for p in results[-1].model.parameters())
    gpu = _losses(tmp_path / "gpu")
    assert all(math.isfinite(v) for v in gpu.values())
    if dtype == "float32":
        _train(name, cfg, copy.deepcopy(model), tokenizer, tmp_path / "cpu", **kwargs)
        cpu = _losses(tmp_path / "cpu")
        keys = [k for k in cpu if name != "circuit_breakers" or k.startswith("1/")]
        for key in keys:
            assert gpu[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-5), key


RECIPES = {
    "lens_unlearn": (lens_unlearn, ""),
    "circuit_breakers": (circuit_breakers, ""),
    "probe_unlearn": (probe_unlearn, " --margin 1.0 --probe_steps 2 --probe_docs 40"),
    "sequential": (sequential, ""),
    "rewritten_transfer": (rewritten_transfer, ""),
    "rmu": (rmu, ""),
    "npo": (npo, ""),
    "simnpo": (simnpo, ""),
    "grad_diff": (grad_diff, ""),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_unlearning_recipe_runs_on_cuda(name, tiny_home, tmp_path):
    recipe, extra = RECIPES[name]
    out = tmp_path / name
    results = recipe.main(parse(recipe.Config, args=["--out", str(out), *(TINY + extra).split()]))
    assert json.loads((out / "results.json").read_text()) == pytest.approx(
        {k: v for k, v in results.items() if k in json.loads((out / "results.json").read_text())}
    )
    assert (out / METRICS_FILE).exists() or any(out.rglob(METRICS_FILE))


def test_the_readme_main_command_runs_on_cuda(tiny_home, tmp_path):
    """`python -m recipes.checkpoint_transfer` (teacher sweep, maps, unlearning, attack and its
    controls) on the tiny world, on CUDA."""
    flags = TINY + " --margin 1.0 --map_docs 40 --tamper_steps 3"
    out = tmp_path / "ct"
    results = checkpoint_transfer.main(
        parse(checkpoint_transfer.Config, args=["--out", str(out), *flags.split()])
    )
    tamper = json.loads((out / "tamper" / "tamper_results.json").read_text())
    assert tamper["records"][0]["forget_acc"] == pytest.approx(results["forget_acc"])
    assert torch.cuda.is_available()
