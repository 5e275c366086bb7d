"""Tiny random models (2 blocks, d_model 32) of every architecture row, and helpers to check them.

Expected values in these tests come from plain PyTorch: Hugging Face ``output_hidden_states`` and
raw ``register_forward_hook`` calls, never from the code under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64
D_MODEL = 32
N_LAYERS = 2
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}

_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    intermediate_size=64,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)

CONFIGS = {
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            use_parallel_residual=True,
            rope_parameters=ROPE,
        )
    ),
    "gpt_neox_sequential": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            use_parallel_residual=False,
            rope_parameters=ROPE,
        )
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLAMA_LIKE)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=32)
    ),
}
"""Architecture name to a builder of a tiny random causal LM (eval mode is set by `make_model`)."""


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny random model of one architecture, in eval mode, built from a fixed seed."""
    torch.manual_seed(seed)
    return CONFIGS[arch]().eval()


def make_tokenizer():
    """A word-level tokenizer over VOCAB tokens, built in memory (no BOS: see bridge_from_hf)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="t0", pad_token="t1", unk_token="t2"
    )


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The block list of a plain Hugging Face model, found without the code under test."""
    inner = getattr(model, "gpt_neox", None) or getattr(model, "model", None)
    return inner.layers if inner is not None else model.transformer.h


def hook_state(model: nn.Module) -> list[tuple[str, int, int, int]]:
    """Every module's count of forward, forward-pre and backward hooks, to compare before/after."""
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
    ]


@pytest.fixture
def tokens() -> torch.Tensor:
    """Token ids [2, 7] that avoid the special ids 0-2."""
    torch.manual_seed(1)
    return torch.randint(3, VOCAB, (2, 7))
