"""Site conventions, interventions and the tuned lens on a real Llama-architecture model.

The tiny random models of tests/interventions check the same conventions per architecture; here
they hold on SmolLM2-135M's trained weights (30 blocks, d_model 576, vocab 49,152).
"""

import random

import pytest
import torch

from interventions import Write, capture_acts, describe_model, lens, patch_acts
from unlearn.data import tokenize_documents
from unlearn.gguf import GGUF_MODELS, SOURCE_FILE, find_packaged_gguf, gguf_model_dir
from unlearn.lens import TunedLens, lens_kl, train_tuned_lens
from unlearn.models import model_key

pytestmark = pytest.mark.usefixtures("no_network")

SUBJECTS = [
    "The old city",
    "My neighbor",
    "The small river",
    "A young doctor",
    "The museum",
    "Our teacher",
    "The market",
    "A quiet village",
    "The train",
    "The library",
]
VERBS = [
    "is known for",
    "was famous for",
    "became popular for",
    "is often visited for",
    "was praised for",
]
OBJECTS = [
    "its bread",
    "the bridges",
    "good music",
    "a long history",
    "fresh fish",
    "warm weather",
    "tall trees",
    "kind people",
    "old books",
    "bright colors",
]


def templated_texts() -> list[str]:
    """500 short sentences, shuffled with a fixed seed (text the model can predict, made here)."""
    texts = [f"{s} {v} {o}." for s in SUBJECTS for v in VERBS for o in OBJECTS]
    random.Random(0).shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def tokens(smollm2):
    encoded = smollm2.tokenizer(
        ["The capital of France is", "Water boils at one hundred"],
        return_tensors="pt",
        padding=True,
    )
    return encoded["input_ids"], encoded["attention_mask"]


def test_loads_from_the_cache_as_a_llama(smollm2):
    """The GGUF file became a cached Hugging Face folder keyed by the file's hash."""
    model, tokenizer = smollm2.hf_model, smollm2.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert describe_model(model).n_layers == 30
    folder = gguf_model_dir("smollm2-135m")  # cached: no second conversion
    assert (folder / SOURCE_FILE).is_file() and (folder / "model.safetensors").is_file()
    assert model_key("smollm2-135m") == f"gguf:{folder.name.rsplit('-', 1)[1]}"
    assert find_packaged_gguf("smollm2-135m").name == GGUF_MODELS["smollm2-135m"].filename
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_block_outputs_are_hidden_states(smollm2, tokens):
    """resid_post[l] = hidden_states[l + 1] for l < 29; the last block's is the un-normed output.

    Llama puts the final norm into its last hidden_states entry, so hidden_states[30] is
    ln_final.hook_normalized; the raw output of block 29 is read with a plain forward hook.
    """
    model = smollm2.hf_model
    input_ids, mask = tokens
    last = {}
    handle = model.model.layers[-1].register_forward_hook(lambda m, i, o: last.setdefault("out", o))
    with torch.no_grad():
        ref = model(input_ids, attention_mask=mask, output_hidden_states=True)
    handle.remove()
    batch = {"input_ids": input_ids, "attention_mask": mask}
    sites = ["blocks.{l}.hook_resid_post", "ln_final.hook_normalized", "unembed"]
    acts = capture_acts(smollm2.model, batch, sites, layers="all")
    real = mask.bool()
    for layer in range(29):
        torch.testing.assert_close(
            acts[f"blocks.{layer}.hook_resid_post"][real], ref.hidden_states[layer + 1][real]
        )
    out = last["out"][0] if isinstance(last["out"], tuple) else last["out"]
    torch.testing.assert_close(acts["blocks.29.hook_resid_post"][real], out[real])
    torch.testing.assert_close(acts["ln_final.hook_normalized"][real], ref.hidden_states[30][real])
    torch.testing.assert_close(acts["unembed"][real], ref.logits[real])


def test_logit_lens_at_the_last_block_is_the_output(smollm2, tokens):
    input_ids, mask = tokens
    batch = {"input_ids": input_ids, "attention_mask": mask}
    decoded = lens(smollm2.model, batch, "blocks.29.hook_resid_post")
    with torch.no_grad():
        logits = smollm2.hf_model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(decoded[mask.bool()], logits[mask.bool()])


def test_a_write_matches_a_forward_hook(smollm2, tokens):
    """Adding a vector at blocks.10.hook_resid_post through the graph = a plain forward hook."""
    model = smollm2.hf_model
    input_ids, mask = tokens
    shift = torch.randn(576) * 0.5
    handle = model.model.layers[10].register_forward_hook(lambda m, i, o: o + shift)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
    handle.remove()
    batch = {"input_ids": input_ids, "attention_mask": mask}
    patched = patch_acts(smollm2.model, batch, [Write("blocks.10.hook_resid_post", shift, "add")])
    torch.testing.assert_close(patched["unembed"][mask.bool()], expected[mask.bool()])


def test_tuned_lens_beats_the_logit_lens_at_every_layer(smollm2):
    """Ten AdamW steps on 20 sentences (about 200 tokens) cut held-out KL at all 29 lenses.

    KL(p_final || p_lens) per layer on 8 held-out sentences; the logit lens goes from about 14
    nats (early blocks) to 2.2 (block 28), the briefly tuned lens stays below it everywhere.
    """
    model, tokenizer = smollm2.hf_model, smollm2.tokenizer
    texts = templated_texts()
    train = tokenize_documents(tokenizer, [{"text": t} for t in texts[:20]], max_len=12)
    held_out = tokenize_documents(tokenizer, [{"text": t} for t in texts[-8:]], max_len=12)
    tuned = TunedLens.for_model(model)
    losses = train_tuned_lens(model, tuned, train.batches(2), num_steps=10, lr=1e-3)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())
    kl = lens_kl(model, tuned, held_out.batches(8))
    assert len(kl["tuned"]) == 29
    worse = [
        layer
        for layer, (t, g) in enumerate(zip(kl["tuned"], kl["logit"], strict=True))
        if not t < g
    ]
    assert not worse, f"tuned lens not better at layers {worse}: {kl}"
