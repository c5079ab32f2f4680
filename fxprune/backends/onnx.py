"""The ONNX target: the dynamo exporter writes the file, ONNX Runtime loads and runs it.

Why it is built this way: everything that is not ONNX-specific (which module to trace, dynamic
dims, parity inputs, atomic publishing, the comparison with PyTorch) lives in
:mod:`fxprune.passes.export`; this module only turns an
:class:`~fxprune.passes.export.ExportRecipe` into ``.onnx`` (+ external data) files with
``torch.onnx.export(dynamo=True)``, and opens and runs them in ONNX Runtime.  The ORT helpers
(:func:`ort_providers`, :func:`ort_session`) are shared with :mod:`fxprune.runtime`, which decodes
and times exported decoders.

``onnx``, ``onnxscript`` and ``onnxruntime`` are imported lazily (the ``fxprune[onnx]`` extra), so
fxprune imports without them and :meth:`OnnxBackend.available` says whether they are there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from fxprune.backends import ExportBackend, register_backend
from fxprune.errors import ExportError

if TYPE_CHECKING:
    from fxprune.passes.export import ExportRecipe

__all__ = ["EXTERNAL_DATA_THRESHOLD", "OnnxBackend", "import_ort", "onnx_io_names", "ort_providers", "ort_session"]

#: Above this many bytes of weights the ONNX file keeps its initializers in a side file.  The hard
#: protobuf limit is 2 GiB; staying well under it leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024**3)

_REQUIRES = "install fxprune[onnx] (onnx, onnxscript, onnxruntime; onnxruntime-gpu for CUDA)"


# --------------------------------------------------------------------------------------------
# ONNX Runtime: providers and sessions
# --------------------------------------------------------------------------------------------


def import_ort() -> Any:
    """Import onnxruntime lazily so that fxprune imports without the ``onnx`` extra."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError(f"onnxruntime is not installed; {_REQUIRES}") from exc
    return ort


def _cuda_usable(ort: Any) -> bool:
    """CUDA EP is only worth choosing when ORT was built with it *and* a GPU is visible."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return torch.cuda.is_available() or ort.get_device() == "GPU"


def ort_providers(device: str = "auto") -> list[str]:
    """Execution providers to build sessions with.

    ``"auto"`` picks CUDA when onnxruntime-gpu and a GPU are both present, else CPU; ``"cuda"``
    insists on CUDA (and says why it cannot have it); ``"cpu"`` forces CPU.  CPU is always
    appended as the fallback ORT needs for ops the CUDA EP lacks.
    """
    ort = import_ort()
    device = device.lower()
    if device not in ("auto", "cpu", "cuda"):
        raise ExportError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if _cuda_usable(ort):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ExportError(
            "device='cuda' but ONNX Runtime cannot use a GPU here "
            f"(available providers: {ort.get_available_providers()}, "
            f"torch.cuda.is_available()={torch.cuda.is_available()}); install onnxruntime-gpu"
        )
    return ["CPUExecutionProvider"]


def ort_session(
    session_or_path: Any, providers: Sequence[str] | None = None, *, intra_op_threads: int | None = None
) -> Any:
    """An ``onnxruntime.InferenceSession``: the one given, or a new one for a path or an
    :class:`~fxprune.passes.export.ExportResult` (so runtime helpers compose with ``export_onnx``).

    ``providers`` default to :func:`ort_providers`; ``intra_op_threads`` (None: ORT's default)
    pins the CPU thread pool, as benchmarks want.  Idle pool threads stop spinning when a run
    returns (``session.force_spinning_stop``), so sessions opened side by side do not slow each other.
    """
    ort = import_ort()
    if isinstance(session_or_path, ort.InferenceSession):
        return session_or_path
    if not isinstance(session_or_path, (str, os.PathLike)) and hasattr(session_or_path, "path"):
        session_or_path = session_or_path.path  # an ExportResult
    path = Path(session_or_path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # keep ORT's warnings about unused initializers out of the way
    # the pool spins during a run and stops when it returns: fxprune opens the dense and the pruned
    # model side by side (bench, parity), and an idle session spinning into the other's run takes
    # its cores (bench/onnx_latency.py)
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ort_providers()))


def onnx_io_names(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Graph input/output names as written (without loading external weights)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


@register_backend
class OnnxBackend(ExportBackend):
    """``torch.onnx.export(dynamo=True)`` to ``.onnx``, checked and run in ONNX Runtime.

    ``optimize`` runs the exporter's ONNX graph optimizer (constant folding, dead code); turning it
    off only makes the export faster, ORT optimizes again at load time.  ``external_data=None``
    stores weights in a side file when they exceed :data:`EXTERNAL_DATA_THRESHOLD`.
    ``providers`` overrides :func:`ort_providers` for the sessions this backend opens.
    """

    name = "onnx"
    suffix = ".onnx"
    runtime = "ONNX Runtime"
    requires = _REQUIRES
    # transformers' default "grouped_mm" is the custom op transformers::grouped_mm_fallback on CPU,
    # which the exporter has no ONNX function for; "batched_mm" is plain gather + bmm
    experts_implementation = "batched_mm"

    def __init__(
        self, *, optimize: bool = True, external_data: bool | None = None, providers: Sequence[str] | None = None
    ) -> None:
        self.optimize = optimize
        self.external_data = external_data
        self._providers = list(providers) if providers else None

    @classmethod
    def available(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))

    def providers(self, device: str = "auto") -> list[str]:
        return list(self._providers) if self._providers else ort_providers(device)

    def provider(self, session: Any) -> str:
        return session.get_providers()[0]

    def export(self, recipe: ExportRecipe, tmp_path: Path) -> list[Path]:
        program = self._torch_onnx_export(recipe)
        use_external = (
            bool(self.external_data) if self.external_data is not None
            else recipe.weights_bytes > EXTERNAL_DATA_THRESHOLD
        )
        program.save(str(tmp_path), external_data=use_external)
        return sorted(tmp_path.parent.iterdir())

    def _torch_onnx_export(self, recipe: ExportRecipe) -> Any:
        """Call the dynamo exporter quietly; wrap its failures in an ExportError with the cause."""
        kwargs: dict[str, Any] = dict(
            dynamo=True, verbose=False, optimize=self.optimize,
            input_names=list(recipe.input_names), output_names=list(recipe.output_names),
        )
        if recipe.dynamic_shapes is not None:
            kwargs["dynamic_shapes"] = recipe.dynamic_shapes
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                return torch.onnx.export(recipe.exportable, recipe.args, **kwargs)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export (dynamo) failed: {type(exc).__name__}: {exc}") from exc

    def session(self, path: Path, device: str = "auto") -> Any:
        return ort_session(path, self.providers(device))

    def run(self, session: Any, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        graph_inputs = [i.name for i in session.get_inputs()]
        names = list(inputs)
        if not set(names) & set(graph_inputs) and len(names) == len(graph_inputs):
            names = graph_inputs  # the exporter renamed the inputs; the order is the same
        # inputs the graph ignores (e.g. an unused mask) may have been dropped from the ONNX graph
        feed = {n: a for n, a in zip(names, inputs.values()) if n in graph_inputs}
        return list(session.run(None, feed))

    def io_names(self, path: Path, recipe: ExportRecipe) -> tuple[list[str], list[str]]:
        return onnx_io_names(path)
