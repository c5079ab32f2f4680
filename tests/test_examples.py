"""Every example in examples/ runs end to end on tiny random models (what a new user copies)."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compiler_api_example(tmp_path):
    assert _load("compiler_api").main(["--out", str(tmp_path / "pruned")]) == 0
    assert (tmp_path / "pruned" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--cnn"]])
def test_vision_example(tmp_path, extra):
    assert _load("vision").main([*extra, "--out", str(tmp_path / "v.onnx")]) == 0
    assert (tmp_path / "v.onnx").exists()


@pytest.mark.slow
def test_llama_end_to_end_example(tmp_path):
    assert _load("llama_end_to_end").main(["--out", str(tmp_path / "llama"), "--steps", "4"]) == 0
    assert (tmp_path / "llama" / "model.safetensors").exists()
    assert (tmp_path / "llama" / "onnx" / "model.onnx").exists()
