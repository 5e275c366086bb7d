"""Config groups: flat setting names over nested groups, round trips through JSON, preset errors."""

import dataclasses
import json

import pytest

from recipes import lens_unlearn
from unlearn.config import (
    LoraSettings,
    OptimSettings,
    TrainingConfig,
    flat_names,
    from_dict,
    replace_flat,
)
from unlearn.methods import REGISTRY
from unlearn.methods.base import ForgetSettings
from unlearn.methods.retain import RetainSettings
from unlearn.runs import parse_config
from unlearn.tamper import ATTACK_PRESETS, AttackSettings


def test_every_method_nests_the_shared_retain_and_forget_groups():
    """One declaration of the six retain/forget settings: each method's config holds them only
    through `forget: ForgetSettings` and `retain: RetainSettings`."""
    shared = {f.name for f in dataclasses.fields(RetainSettings)}
    shared |= {f.name for f in dataclasses.fields(ForgetSettings)}
    for name, registration in REGISTRY.items():
        cfg = registration.default_config()
        assert isinstance(cfg.forget, ForgetSettings) and isinstance(cfg.retain, RetainSettings)
        own = {f.name for f in dataclasses.fields(cfg)}
        assert not own & shared, name
        assert shared <= flat_names(cfg), name


def test_replace_flat_sets_nested_settings_by_their_flag_names():
    cfg = REGISTRY["circuit_breakers"].default_config()
    changed = replace_flat(cfg, retain_coef=0.0, layers=[1], forget_ramp="constant")
    assert changed.retain == dataclasses.replace(cfg.retain, retain_coef=0.0)
    assert changed.forget == ForgetSettings(forget_coef=1.0, forget_ramp="constant")
    assert changed.layers == [1] and changed.orth_coef == cfg.orth_coef
    assert cfg.retain.retain_coef == 1.0  # the original is unchanged
    training = replace_flat(TrainingConfig(), lr=1e-2, lora_rank=4, num_steps=3)
    assert training.optim == OptimSettings(lr=1e-2)
    assert training.lora == LoraSettings(lora_rank=4) and training.num_steps == 3
    with pytest.raises(ValueError, match=r"has no setting retain_cof; its settings: .*retain_coef"):
        replace_flat(cfg, retain_cof=0.0)


def test_from_dict_inverts_asdict_through_json():
    for settings in (*ATTACK_PRESETS.values(), TrainingConfig(lora=LoraSettings(lora_rank=2))):
        values = json.loads(json.dumps(dataclasses.asdict(settings)))
        assert from_dict(type(settings), values) == settings
    lora = from_dict(
        AttackSettings, json.loads(json.dumps(dataclasses.asdict(ATTACK_PRESETS["lora"])))
    )
    assert lora.optim.betas == (0.9, 0.95) and lora.early_evals == (5, 10, 15, 20)


def test_a_preset_key_outside_its_group_names_the_group(tmp_path):
    preset = tmp_path / "old.yaml"
    preset.write_text("training:\n  lr: 0.001\nmethod:\n  retain_coef: 5.0\n  nope: 1\n")
    with pytest.raises(ValueError) as error:
        parse_config(lens_unlearn.Config, ["--config_path", str(preset)])
    message = str(error.value)
    assert "training.lr belongs to a group: write it as training.optim.lr" in message
    assert "method.retain_coef belongs to a group: write it as method.retain.retain_coef" in message
    assert "method.nope is not a setting of LensUnlearnConfig" in message
    preset.write_text(
        "training:\n  optim:\n    lr: 0.001\nmethod:\n  retain:\n    retain_coef: 5.0\n"
    )
    cfg = parse_config(lens_unlearn.Config, ["--config_path", str(preset)])
    assert cfg.training.optim.lr == 0.001 and cfg.method.retain.retain_coef == 5.0
    assert cfg.method.retain.retain_loss == "kl"  # the rest of the group keeps its defaults


def test_lora_rank_zero_is_full_fine_tuning():
    assert not LoraSettings().enabled and LoraSettings(lora_rank=1).enabled
    with pytest.raises(ValueError, match="--lora_rank must be >= 0"):
        LoraSettings(lora_rank=-1)
