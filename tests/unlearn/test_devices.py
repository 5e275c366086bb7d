"""Device placement: every registered method, the maps, the lens and the tamper attack run with the
model on a second device (`tests.other_device`), where a tensor, generator, map or lens left on
the CPU fails the way it would on a GPU; and the numbers match the same run on the CPU.
"""

import copy
import json
import math

import pytest
import torch

from tests.conftest import TINY_TEXTS
from tests.other_device import is_on_device, other_device
from tests.unlearn.test_methods import (
    MAPS,
    PROBES,
    REWRITTEN,
    SCORES,
    TEACHER,
    TUNED_LENS,
    _config,
    _context,
)
from unlearn.data import PairedBatches, tokenize_documents
from unlearn.lens import TunedLens, lens_kl, train_tuned_lens
from unlearn.losses import random_target_ce_loss
from unlearn.maps import AffineMap, load_maps, save_maps
from unlearn.methods import REGISTRY, registration
from unlearn.tamper import AttackSettings, attack
from unlearn.training import METRICS_FILE, LoraSettings, TrainResult, train_plan

CASES = {
    "lens_unlearn": {},  # random-target cross-entropy through the logit lens
    "lens_unlearn-tuned": {"lens_path": TUNED_LENS},
    "circuit_breakers": {},
    "checkpoint_transfer": {"teacher": TEACHER, "teacher_revision": "step1", "maps_path": MAPS},
    "probe_unlearn": {"probe_path": PROBES},
    "sequential": {},  # one phase per block, routed into a copy of the model on its device
    "rewritten_transfer": {"rewritten_data": REWRITTEN},  # targets computed on the model's device
    "rmu": {},  # the control vector, drawn on the CPU, moved to the activations' device
    "npo": {},
    "simnpo": {},
    "grad_diff": {},
    "undo": {"teacher": TEACHER},  # the teacher loaded to the device, the noise drawn on the CPU
    "rewind_distill": {"checkpoint": TEACHER, "checkpoint_revision": "step1", "teacher": TEACHER},
    "detractor": {"scores_path": SCORES},  # per-token weights moved to the loss's device
    "tar": {},  # its simulated attack is the core's, run by the tests of --tar_steps
}
"""Every registered method, with the files (lens, maps, probes, teacher, rewritten twins) it loads
from disk."""

FORGET_DOCS = [{"text": text[: 8 * (i + 1)]} for i, text in enumerate(TINY_TEXTS)]
RETAIN_DOCS = [{"text": text[: 6 * (4 - i)]} for i, text in enumerate(TINY_TEXTS)]
MAX_LEN = 24


def test_every_registered_method_has_a_device_case():
    assert {name.split("-")[0] for name in CASES} == set(REGISTRY)


def test_the_second_device_fails_where_cuda_fails():
    """The harness itself: mixing, matmul with a CPU operand and a CPU generator all raise."""
    with other_device() as device:
        x = torch.ones(3, 4).to(device)
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3, 4)
        with pytest.raises(RuntimeError, match="same device"):
            x @ torch.ones(4, 2)
        with pytest.raises(RuntimeError, match="generator"):
            torch.randint(5, (3,), generator=torch.default_generator, device=x.device)
        assert torch.equal((x * 2 + torch.tensor(1.0)).cpu(), torch.full((3, 4), 3.0))
        assert torch.arange(3).to(device).tolist() == [0, 1, 2]  # a copy to the host, as on CUDA
        assert is_on_device(torch.zeros(2, device=x.device)) and not is_on_device(x.cpu())


def _pairs(tokenizer):
    forget = tokenize_documents(tokenizer, FORGET_DOCS, max_len=MAX_LEN)
    retain = tokenize_documents(tokenizer, RETAIN_DOCS, max_len=MAX_LEN)
    return PairedBatches(forget, retain, batch_size=4)


def _train(name, cfg, model, tokenizer, out_dir, num_steps, **kwargs) -> list[TrainResult]:
    """Build the method as a run builds it (`build` reads the model, on its device) and train its
    phases with the training core: a phase of `num_steps` steps per phase of the plan."""
    device = str(next(model.parameters()).device)
    context = _context(model, tokenizer, out_dir, num_steps, device)
    plan = registration(name).build(cfg, context)
    return train_plan(model, plan.phases, _pairs(tokenizer), out_dir=out_dir, **kwargs)


def _losses(out_dir) -> dict[str, float]:
    """Every logged loss of a run, keyed "<step>/<name>" ("<phase>/<step>/<name>" for the phases
    of a multi-phase plan, each in its own sub-directory)."""
    losses = {}
    for path in sorted(out_dir.rglob(METRICS_FILE)):
        phase = path.parent.relative_to(out_dir).as_posix()
        prefix = "" if phase == "." else f"{phase}/"
        for line in path.read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if key.startswith("loss/"):
                    losses[f"{prefix}{record['step']}/{key}"] = value
    return losses


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_training_step_on_another_device_matches_the_cpu(case, use_lora, tiny_lm, tmp_path):
    """Two steps of every phase per method, model on the second device, method built as recipes
    build it (`build` with the model's device: files loaded from disk, the teacher loaded to the
    model's device, targets computed there): the logged losses equal a CPU run's (random targets
    are drawn the same on every device) and the weights stay on the device."""
    model, tokenizer = tiny_lm
    name = case.split("-")[0]
    torch.manual_seed(1)
    cfg = _config(name, CASES[case], tmp_path, model, tokenizer)
    lora = LoraSettings(lora_rank=4) if use_lora else None
    kwargs = dict(num_steps=2, optim=dict_optim(), lora=lora, seed=3)

    _train(name, cfg, copy.deepcopy(model), tokenizer, tmp_path / "cpu", **kwargs)
    with other_device() as device:
        on_device = copy.deepcopy(model).to(device)
        results = _train(name, cfg, on_device, tokenizer, tmp_path / "dev", **kwargs)
        assert all(is_on_device(p) for p in results[-1].model.parameters())
    cpu, dev = _losses(tmp_path / "cpu"), _losses(tmp_path / "dev")
    assert dev.keys() == cpu.keys() and len(cpu) >= 4
    for key in cpu:
        assert dev[key] == pytest.approx(cpu[key], rel=1e-4, abs=1e-6), key


def dict_optim():
    from unlearn.training import OptimSettings

    return OptimSettings(lr=1e-3, warmup_steps=1)


def test_random_targets_are_the_same_on_every_device():
    logits = torch.randn(2, 3, 11)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    torch.manual_seed(5)
    on_cpu = random_target_ce_loss(logits, mask)
    with other_device() as device:
        torch.manual_seed(5)
        on_device = random_target_ce_loss(logits.to(device), mask.to(device))
        assert is_on_device(on_device)
        assert float(on_device) == pytest.approx(float(on_cpu), rel=1e-6)


def test_maps_loaded_from_disk_apply_on_the_device_of_their_input(tmp_path):
    maps = {0: AffineMap(torch.randn(4, 3), torch.randn(4))}
    loaded = load_maps(save_maps(maps, tmp_path))
    x = torch.randn(5, 3)
    expected = x @ maps[0].weight.T + maps[0].bias
    with other_device() as device:
        y = loaded[0](x.to(device))
        assert is_on_device(y)
        assert torch.allclose(y.cpu(), expected, atol=1e-6)
        assert torch.allclose(loaded[0].to(device)(x.to(device)).cpu(), expected, atol=1e-6)
        y16 = loaded[0](x.to(device, torch.bfloat16))
        assert y16.dtype == torch.bfloat16


def test_a_lens_loaded_from_disk_trains_and_reads_on_the_device(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.translators[0].weight.add_(0.1 * torch.randn_like(lens.translators[0].weight))
    path = lens.save(tmp_path / "lens")
    batch, _ = _pairs(tokenizer).at(0)
    expected = lens_kl(model, TunedLens.load(path), [batch])
    with other_device() as device:
        on_device = copy.deepcopy(model).to(device)
        loaded = TunedLens.load(path)  # on the CPU: it follows the activations it meets
        kl = lens_kl(on_device, loaded, [batch.to(device)])
        losses = train_tuned_lens(on_device, loaded, [batch.to(device)], num_steps=1)
        assert all(is_on_device(p) for p in loaded.parameters())
    for kind in expected:
        assert kl[kind] == pytest.approx(expected[kind], rel=1e-4)
    assert losses[0] == pytest.approx(sum(expected["tuned"]) / len(expected["tuned"]), rel=1e-4)


def test_the_tamper_attack_runs_on_the_device(tiny_world, tmp_path):
    from unlearn.models import load_model

    loaded = load_model(str(tiny_world.model_dir("unfiltered")))
    items = {split: tiny_world.items(split)[:8] for split in ("forget_test", "retain")}
    docs = tiny_world.corpus("forget_attack")[:16]
    settings = AttackSettings(num_steps=2, batch_size=4, max_len=32)
    cpu_records, _ = attack(
        copy.deepcopy(loaded.hf_model), loaded.tokenizer, docs, items, settings, tmp_path / "cpu"
    )
    with other_device() as device:
        model = copy.deepcopy(loaded.hf_model).to(device)
        records, attacked = attack(model, loaded.tokenizer, docs, items, settings, tmp_path / "d")
        assert all(is_on_device(p) for p in attacked.parameters())
    assert [r["step"] for r in records] == [r["step"] for r in cpu_records]
    for got, want in zip(records, cpu_records, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_the_main_command_runs_on_the_device(tiny_home, tmp_path):
    """The README's main command (checkpoint transfer: teacher sweep, map fitting, unlearning, the
    attack and its controls) on the tiny world with ``--model.device`` set to the second device."""
    from simple_parsing import parse

    from recipes import checkpoint_transfer

    flags = "--world_preset tiny --num_steps 2 --batch_size 4 --margin 1.0 --map_docs 40"
    flags += " --tamper_steps 2"
    with other_device() as device:
        args = ["--out", str(tmp_path / "ct"), "--device", str(device), *flags.split()]
        results = checkpoint_transfer.main(parse(checkpoint_transfer.Config, args=args))
    assert set(results) >= {"forget_acc", "retain_acc"}


@pytest.mark.parametrize("name", ["sequential", "rewritten_transfer", "probe_unlearn"])
def test_the_other_unlearning_recipes_run_on_the_device(name, tiny_home, tmp_path):
    """The recipes whose preparation does the most (back-to-front phases, precomputed rewritten
    targets, probe unlearning's teacher sweep and probe training), end to end on the second
    device."""
    import importlib

    from simple_parsing import parse

    recipe = importlib.import_module(f"recipes.{name}")
    flags = "--world_preset tiny --num_steps 2 --batch_size 4"
    if name == "probe_unlearn":
        flags += " --margin 1.0 --probe_steps 2 --probe_docs 40 --d_probe 16 --probe_ffn 32"
    with other_device() as device:
        args = ["--out", str(tmp_path / name), "--device", str(device), *flags.split()]
        results = recipe.main(parse(recipe.Config, args=args))
    assert math.isfinite(results["forget_acc"]) and math.isfinite(results["retain_acc"])
