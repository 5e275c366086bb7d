import pytest
import torch

from interventions import unwrap
from unlearn.models import CHECKPOINTS_DIR, list_checkpoints, load_model


@pytest.fixture
def saved_model(tiny_lm, tmp_path):
    """A model saved with save_pretrained, plus two checkpoints with different weights."""
    model, tokenizer = tiny_lm
    root = tmp_path / "model"
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    for step, scale in ((10, 0.5), (2, 2.0)):
        changed = type(model)(model.config)
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            changed.gpt_neox.embed_in.weight.mul_(scale)
        changed.save_pretrained(root / CHECKPOINTS_DIR / f"step{step}")
        tokenizer.save_pretrained(root / CHECKPOINTS_DIR / f"step{step}")
    return root, model


def test_loads_final_model_and_checkpoints_from_local_saves(saved_model):
    root, model = saved_model
    final = load_model(root)
    torch.testing.assert_close(
        final.hf_model.gpt_neox.embed_in.weight, model.gpt_neox.embed_in.weight
    )
    ckpt = load_model(str(root), checkpoint="step10")
    torch.testing.assert_close(
        ckpt.hf_model.gpt_neox.embed_in.weight, 0.5 * model.gpt_neox.embed_in.weight
    )
    assert ckpt.revision == "step10"
    # For a local directory a revision names a checkpoint too.
    same = load_model(root, revision="step2")
    torch.testing.assert_close(
        same.hf_model.gpt_neox.embed_in.weight, 2.0 * model.gpt_neox.embed_in.weight
    )
    assert list_checkpoints(root) == ["step2", "step10"]


def test_loaded_model_traces_with_nnsight(saved_model):
    root, model = saved_model
    loaded = load_model(root)
    ids = loaded.tokenizer("Alice Smith lives in", return_tensors="pt")["input_ids"]
    with loaded.model.trace(ids):
        hidden = loaded.model.gpt_neox.layers[0].output.save()
        logits = loaded.model.output.logits.save()
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, expected.logits)
    torch.testing.assert_close(hidden, expected.hidden_states[1])
    # hf_model is the module inside the wrapper, not a copy: an edit shows in the next trace.
    assert loaded.hf_model is unwrap(loaded.model)
    with torch.no_grad():
        loaded.hf_model.get_output_embeddings().weight.zero_()
    with loaded.model.trace(ids):
        zeroed = loaded.model.output.logits.save()
    assert (zeroed == 0).all()


def test_bfloat16_load(saved_model):
    root, _ = saved_model
    loaded = load_model(root, dtype="bfloat16")
    assert loaded.hf_model.dtype == torch.bfloat16


def test_missing_checkpoint_lists_available(saved_model):
    root, _ = saved_model
    with pytest.raises(FileNotFoundError, match=r"step999.*available: \['step2', 'step10'\]"):
        load_model(root, checkpoint="step999")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_missing_tokenizer_is_a_clear_error(tiny_lm, tmp_path):
    model, _ = tiny_lm
    model.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(tmp_path / "weights_only")


def test_tokenizer_from_elsewhere(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path / "weights_only")
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_model(tmp_path / "weights_only", tokenizer=tmp_path / "tok")
    assert loaded.tokenizer("Paris")["input_ids"] == tokenizer("Paris")["input_ids"]


def test_conflicting_arguments(saved_model):
    root, _ = saved_model
    with pytest.raises(ValueError, match="pass one"):
        load_model(root, revision="step2", checkpoint="step10")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(root, dtype="float8")
