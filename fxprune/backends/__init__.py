"""Deployment targets (ONNX, and whatever comes next) behind one small interface.

Why this package exists: exporting a pruned model has a target-neutral half -- deciding what to
trace (a plain module, an ``ExportedProgram``, an HF decoder with an explicit KV cache), with which
dynamic dims, which inputs the export never saw to check it with, publishing the files atomically
and comparing the target's outputs with PyTorch's -- and a target-specific half: write the files,
load them, run them.  :mod:`fxprune.passes.export` does the first half once, as an immutable
:class:`~fxprune.passes.export.ExportRecipe`; an :class:`ExportBackend` does only the second.

Adding a target (ExecuTorch, TensorRT, OpenVINO...) means adding one module here,
``fxprune/backends/<name>.py``, with one ``@register_backend`` class.  The modules of this package
are imported on the first lookup of a name, so they must import cheaply: heavy runtimes are
imported inside the methods, and :meth:`ExportBackend.available` says whether they are installed.
A backend defined elsewhere (a test, a plugin) registers itself the same way.

Inputs and outputs cross the backend boundary as NumPy arrays (:func:`to_numpy`), which is what
every runtime speaks.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, TypeVar

import numpy as np
import torch

from fxprune.errors import ExportError
from fxprune.util.modules import resolve_device

if TYPE_CHECKING:  # the harness imports this package, not the other way round
    from fxprune.passes.export import ExportRecipe

__all__ = ["BACKENDS", "ExportBackend", "get_backend", "known_backends", "register_backend", "to_numpy"]


class ExportBackend(abc.ABC):
    """One deployment target: write a recipe's files, open them, run them.

    Class attributes: ``name`` (the registry key, ``backend="..."``), ``suffix`` (the main file's
    usual extension), ``runtime`` (how messages name the runtime) and ``requires`` (what to install
    when :meth:`available` is False).  Constructor keyword arguments are the target's own options
    (``export(..., backend="onnx", optimize=False)`` builds ``OnnxBackend(optimize=False)``).
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    runtime: ClassVar[str] = ""
    requires: ClassVar[str] = ""
    #: the transformers ``experts_implementation`` an MoE model is exported with (None: as it is),
    #: for targets that cannot convert an implementation's custom ops
    experts_implementation: ClassVar[str | None] = None

    @classmethod
    def available(cls) -> bool:
        """Whether the exporter and runtime this backend needs are installed."""
        return True

    @abc.abstractmethod
    def export(self, recipe: ExportRecipe, tmp_path: Path) -> list[Path]:
        """Write ``recipe`` to ``tmp_path`` (and side files next to it); return every file written.

        ``tmp_path.parent`` is a private, empty temporary directory; the harness publishes its
        files next to the destination, side files first and ``tmp_path``'s name last.
        """

    @abc.abstractmethod
    def session(self, path: Path, device: str = "auto") -> Any:
        """Load the main file at ``path`` for running on ``device`` (``auto``, ``cpu``, ``cuda``)."""

    @abc.abstractmethod
    def run(self, session: Any, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on named inputs (in the recipe's input order); the outputs in recipe order."""

    def providers(self, device: str = "auto") -> list[str]:
        """What a session on ``device`` runs on (ORT: its execution providers), for reports."""
        return [str(resolve_device(device))]

    def provider(self, session: Any) -> str:
        """What this open ``session`` runs on, for latency reports."""
        return self.providers()[0]

    def io_names(self, path: Path, recipe: ExportRecipe) -> tuple[list[str], list[str]]:
        """Input and output names as written (the recipe's, unless the target renames them)."""
        return list(recipe.input_names), list(recipe.output_names)


#: name -> backend class; filled by :func:`register_backend`.
BACKENDS: dict[str, type[ExportBackend]] = {}

_B = TypeVar("_B", bound=type[ExportBackend])


def register_backend(cls: _B) -> _B:
    """Class decorator: make ``cls`` available as ``backend=cls.name``.

    Registering a different class under a name that is taken is refused (re-registering the same
    class, e.g. on a module reload, is fine).
    """
    if not (isinstance(cls, type) and issubclass(cls, ExportBackend)):
        raise ExportError(f"register_backend expects an ExportBackend subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not isinstance(getattr(cls, "suffix", None), str):
        raise ExportError(f"{cls.__qualname__} needs class attributes `name` and `suffix` (strings)")
    old = BACKENDS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ExportError(f"export backend {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    BACKENDS[name] = cls
    return cls


_builtins_loaded = False


def _load_builtins() -> None:
    """Import every module of this package once, so that its backends register themselves."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def known_backends() -> list[str]:
    """Names of every registered backend (built-in ones included), sorted."""
    _load_builtins()
    return sorted(BACKENDS)


def get_backend(backend: str | ExportBackend, **options: Any) -> ExportBackend:
    """An :class:`ExportBackend` instance: ``backend`` itself, or the registered one named so,
    built with ``options``.  An unknown name raises :class:`ExportError` listing the known ones."""
    if isinstance(backend, ExportBackend):
        if options:
            raise ExportError(f"options {sorted(options)} apply to a backend name, not to a ready {backend.name!r} backend")
        return backend
    if not isinstance(backend, str):
        raise ExportError(f"backend must be a name or an ExportBackend, got {type(backend).__name__}")
    cls = BACKENDS.get(backend)
    if cls is None:
        known = known_backends()
        cls = BACKENDS.get(backend)
        if cls is None:
            raise ExportError(f"unknown export backend {backend!r}; known backends: {', '.join(known)}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise ExportError(f"export backend {backend!r} does not take these options {sorted(options)}: {exc}") from exc


def to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """The NumPy array handed to or compared with a backend (bfloat16 becomes float32)."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()
