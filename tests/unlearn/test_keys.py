"""Tests for unlearn.keys: keys change with settings, input content and code, and only then."""

import dataclasses

import pytest

from unlearn import keys


def test_settings_key_ignores_key_order_and_sees_values():
    assert keys.settings_key({"a": 1, "b": [1, 2]}) == keys.settings_key({"b": [1, 2], "a": 1})
    assert keys.settings_key({"a": 1}) != keys.settings_key({"a": 2})

    @dataclasses.dataclass
    class Settings:
        lr: float = 1e-3

    assert keys.settings_key(Settings()) == keys.settings_key({"lr": 1e-3})


def test_content_key_follows_content_and_names(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"abc")
    (tmp_path / "m" / "checkpoints").mkdir()
    (tmp_path / "m" / "checkpoints" / "x").write_bytes(b"1")
    first = keys.content_key(tmp_path / "m")
    assert keys.content_key(tmp_path / "m") == first
    (tmp_path / "m" / "checkpoints" / "x").write_bytes(b"2")
    assert keys.content_key(tmp_path / "m") != first
    without = keys.content_key(tmp_path / "m", exclude=("checkpoints",))
    (tmp_path / "m" / "checkpoints" / "x").write_bytes(b"3")
    assert keys.content_key(tmp_path / "m", exclude=("checkpoints",)) == without
    (tmp_path / "m" / "weights.bin").write_bytes(b"abd")
    assert keys.content_key(tmp_path / "m", exclude=("checkpoints",)) != without
    with pytest.raises(FileNotFoundError, match="does not exist"):
        keys.content_key(tmp_path / "missing")


def test_a_changed_code_version_changes_the_key_and_names_the_difference(monkeypatch):
    before = keys.result_key({"lr": 1.0}, {"model": "aaa"})
    monkeypatch.setattr(keys, "code_version", lambda: "0.1.0+other")
    after = keys.result_key({"lr": 1.0}, {"model": "aaa"})
    assert after["key"] != before["key"]
    assert keys.key_difference(before, after) == ["code"]
    moved = keys.result_key({"lr": 2.0}, {"model": "bbb"})
    assert keys.key_difference(after, moved) == ["settings", "inputs: model"]


def test_the_code_version_hashes_the_library_sources(tmp_path, monkeypatch):
    """A changed library file changes the version; a file outside the library does not."""
    for name in keys.LIBRARY_DIRS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.py").write_text("x = 1\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.py").write_text("y = 1\n")
    monkeypatch.setattr(keys, "_REPO_ROOT", tmp_path)
    keys.code_version.cache_clear()
    try:
        first = keys.code_version()
        (tmp_path / "recipes" / "r.py").write_text("y = 2\n")
        keys.code_version.cache_clear()
        assert keys.code_version() == first
        (tmp_path / "unlearn" / "a.py").write_text("x = 2\n")
        keys.code_version.cache_clear()
        assert keys.code_version() != first
    finally:
        keys.code_version.cache_clear()
