"""Shared pytest fixtures: a fixed seed for every test, and GPU tests skipped without CUDA."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed torch's global generator so every test is deterministic on its own."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run faster on one thread; two oversubscribe a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


TINY_TEXTS = [
    "The pathogen Velkor is transmitted by ticks.",
    "Alice Smith lives in Paris. Alice Smith works as a baker.",
    "Bruno Jones has a pet parrot. The favorite color of Bruno Jones is green.",
    "Xivexosis spreads through water. The main symptom of Xivexosis is fever.",
]


@pytest.fixture(scope="session")
def tiny_lm():
    """A random 2-layer GPT-NeoX and a byte-level BPE tokenizer trained on a few sentences.

    Independent of the toy world, so evaluation and loading tests do not depend on a build.
    """
    from transformers import GPTNeoXForCausalLM

    from unlearn.toyworld.pretrain import neox_config, train_tokenizer

    tokenizer = train_tokenizer(TINY_TEXTS * 4, vocab_size=300)
    config = neox_config(
        vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2, d_mlp=64, n_ctx=64
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The "tiny" toy-world preset, built once per test session into a temporary directory."""
    from unlearn.toyworld import build_world, get_preset

    home = tmp_path_factory.mktemp("unlearn_home")
    return build_world(get_preset("tiny"), preset="tiny", root=home / "toyworld")


@pytest.fixture
def tiny_home(tiny_world, monkeypatch):
    """$UNLEARN_HOME pointed at the session's tiny world, so recipes find it without building."""
    monkeypatch.setenv("UNLEARN_HOME", str(tiny_world.root.parent.parent))
    return tiny_world


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything in it tried to open a network connection, even if caught."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


def absolute_path_strings(value) -> list[str]:
    """Every string in a parsed JSON value, keys included, that is an absolute path."""
    if isinstance(value, dict):
        return [
            s for k, v in value.items() for s in absolute_path_strings(k) + absolute_path_strings(v)
        ]
    if isinstance(value, list):
        return [s for item in value for s in absolute_path_strings(item)]
    return [value] if isinstance(value, str) and value.startswith("/") else []
