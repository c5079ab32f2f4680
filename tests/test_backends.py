"""Export backends: a second target is one small class, and it gets the harness for free.

The ``torch-ep`` backend below saves the recipe as a ``torch.export`` program (plus a JSON side
file with the I/O names) and runs it with ``torch.export.load``.  Going through
:func:`fxprune.passes.export.export`, it is published atomically, refused over an existing file,
and checked against eager PyTorch at unseen shapes like the ONNX backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.backends import BACKENDS, ExportBackend, get_backend, known_backends, register_backend
from fxprune.errors import ExportError, OutputExistsError, VerificationError
from fxprune.passes.export import ExportRecipe, build_recipe, export
from fxprune.runtime import benchmark_forward
from fxprune.util.outputs import tensor_leaves


@register_backend
class TorchEPBackend(ExportBackend):
    """``torch.export.save`` / ``torch.export.load``: the smallest complete backend."""

    name = "torch-ep"
    suffix = ".pt2"
    runtime = "torch.export"

    def export(self, recipe: ExportRecipe, tmp_path: Path) -> list[Path]:
        ep = torch.export.export(recipe.exportable, recipe.args, dynamic_shapes=recipe.dynamic_shapes)
        torch.export.save(ep, tmp_path)
        side = tmp_path.with_name(tmp_path.name + ".json")
        side.write_text(json.dumps({"inputs": recipe.input_names, "outputs": recipe.output_names}))
        return [side, tmp_path]

    def session(self, path: Path, device: str = "auto") -> Any:
        return torch.export.load(path).module()

    def run(self, session: Any, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = session(*[torch.from_numpy(a) for a in inputs.values()])
        return [t.numpy() for t in tensor_leaves(out)]

    def io_names(self, path: Path, recipe: ExportRecipe) -> tuple[list[str], list[str]]:
        names = json.loads(path.with_name(path.name + ".json").read_text())
        return names["inputs"], names["outputs"]


class Unavailable(TorchEPBackend):
    name = "not-installed"
    requires = "pip install a-runtime-that-is-not-there"

    @classmethod
    def available(cls) -> bool:
        return False


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class OffByOne(TorchEPBackend):
    """Runs the saved program correctly, then adds 1: the parity check must catch it."""

    def run(self, session: Any, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [out + 1 for out in super().run(session, inputs)]


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_second_backend_runs_through_the_same_harness(tmp_path):
    model = TinyCNN()
    model.train()
    res = export(model, tmp_path / "cnn.pt2", backend="torch-ep", example_inputs={"x": torch.randn(2, 3, 8, 8)})
    assert res.backend == "torch-ep" and res.path.is_file()
    assert res.files == ["cnn.pt2", "cnn.pt2.json"] and res.external_data
    assert res.file_size == sum(os.path.getsize(tmp_path / f) for f in res.files)
    assert res.input_names == ["x"] and res.output_names == ["output"]
    assert res.check_shapes["x"] == (3, 3, 8, 8)  # checked at a batch the export never saw
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-5
    assert model.training  # handed back in the mode it came in
    assert _no_temp_files(tmp_path)

    loaded = get_backend("torch-ep").session(res.path)
    x = torch.randn(5, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x)[0].numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)

    lat = benchmark_forward(res, {"x": x}, warmup=1, repeats=2)  # the result knows its backend
    assert lat.backend == "torch-ep" and lat.forward_ms > 0 and len(lat.samples_ms) == 2


def test_second_backend_refuses_existing_output_and_publishes_nothing_on_mismatch(tmp_path):
    target = tmp_path / "m.pt2"
    target.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export(TinyCNN(), target, backend="torch-ep", example_inputs={"x": torch.randn(2, 3, 8, 8)})
    assert target.read_bytes() == b"precious" and os.listdir(tmp_path) == ["m.pt2"]

    with pytest.raises(VerificationError, match=r"torch.export output 'output' differs .*max \|diff\| = 1.0.*\(3, 3, 8, 8\)"):
        export(TinyCNN(), tmp_path / "bad.pt2", backend=OffByOne(), example_inputs={"x": torch.randn(2, 3, 8, 8)})
    assert os.listdir(tmp_path) == ["m.pt2"]


def test_unknown_backend_names_the_registered_ones(tmp_path):
    with pytest.raises(ExportError, match=r"unknown export backend 'tensorrt'; known backends: .*onnx.*torch-ep"):
        export(TinyCNN(), tmp_path / "a.engine", backend="tensorrt", example_inputs={"x": torch.randn(2, 3, 8, 8)})
    assert {"onnx", "torch-ep"} <= set(known_backends())
    assert not list(tmp_path.iterdir())


def test_registry_refuses_bad_and_clashing_classes_and_unavailable_backends(tmp_path):
    class Clash(TorchEPBackend):
        name = "onnx"

    with pytest.raises(ExportError, match="already registered"):
        register_backend(Clash)
    with pytest.raises(ExportError, match="ExportBackend subclass"):
        register_backend(dict)  # type: ignore[arg-type]
    assert BACKENDS["onnx"].__module__ == "fxprune.backends.onnx"

    with pytest.raises(ExportError, match="not available here: pip install a-runtime"):
        export(TinyCNN(), tmp_path / "a.x", backend=Unavailable(), example_inputs={"x": torch.randn(2, 3, 8, 8)})
    with pytest.raises(ExportError, match="does not take these options"):
        get_backend("onnx", no_such_option=1)
    assert not list(tmp_path.iterdir())


def test_recipe_is_immutable_and_parsed_once():
    recipe = build_recipe(TinyCNN().eval(), {"x": torch.randn(1, 3, 8, 8)})
    assert recipe.args[0].shape[0] == 2 and any("enlarged" in n for n in recipe.notes)
    assert recipe.input_names == ("x",) and recipe.check_shapes == {"x": (3, 3, 8, 8)}
    with pytest.raises(Exception):
        recipe.notes = ()  # type: ignore[misc]


def test_onnx_forward_benchmark_and_old_import_paths(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import fxprune.passes.export as old
    from fxprune import backends, runtime
    from fxprune.backends import onnx as onnx_backend

    for name in ("benchmark_latency", "onnx_generate"):
        assert getattr(old, name) is getattr(runtime, name)
    assert old.ort_providers is onnx_backend.ort_providers and callable(old.kv_cache_layout)
    assert backends.get_backend("onnx").suffix == ".onnx"

    res = old.export_onnx(TinyCNN().eval(), tmp_path / "cnn.onnx", example_inputs={"x": torch.randn(2, 3, 8, 8)},
                          optimize=False)
    lat = runtime.benchmark_forward(res.path, {"x": torch.randn(4, 3, 8, 8), "unused": torch.ones(4)},
                                    warmup=1, repeats=3)
    assert lat.backend == "onnx" and lat.provider == "CPUExecutionProvider"
    assert lat.forward_ms > 0 and len(lat.samples_ms) == 3 and lat.input_shapes["x"] == (4, 3, 8, 8)
