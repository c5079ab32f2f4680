"""Module plumbing shared by every pass: eval mode, devices, forward signatures, calls."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Mapping

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Put ``model`` in eval mode and restore *every* submodule's own flag afterwards.

    ``model.train(was_training)`` would flip submodules the user had put in another mode (a
    frozen BatchNorm in eval inside a training model), so each flag is saved and restored.
    GraphModules from ``ExportedProgram.module()`` refuse ``.eval()``; they are used as they are.
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        yield model
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
    except Exception:  # noqa: BLE001 - modules that refuse eval() run as they are
        pass
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device | None:
    """The one device every parameter and buffer of ``model`` lives on, or None if several."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devices:
        return torch.device("cpu")
    return devices.pop() if len(devices) == 1 else None


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """Run a pass with ``model`` on ``device``: move it there and back afterwards (also on error).

    A model spread over several devices (``device_map="auto"``) is used where it is, with a warning.
    """
    import warnings

    home = model_device(model)
    if home is None:
        warnings.warn("fxprune: the model spans several devices; running it where it is", stacklevel=4)
        yield next(model.parameters()).device
        return
    if home == device or (home.type == device.type and device.index is None):
        yield home
        return
    model.to(device)
    try:
        yield device
    finally:
        model.to(home)


def first_device(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer (CPU for a module without any)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter (float32 when there is none)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def on_meta(model: nn.Module) -> bool:
    """Whether the model was built on the meta device (shapes only, no weights)."""
    for p in model.parameters():
        return p.device.type == "meta"
    return False


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when a GPU is visible, else CPU; anything else is taken as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def forward_params(model: Any) -> dict[str, inspect.Parameter]:
    """The parameters of ``model.forward`` (or of ``model`` itself when it is a function)."""
    fn = getattr(model, "forward", model)
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def accepts_kwarg(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (explicitly or through ``**kwargs``)."""
    params = forward_params(model)
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def takes_param(model: Any, name: str) -> bool:
    """Whether ``model.forward`` names ``name`` explicitly (``**kwargs`` does not count)."""
    return name in forward_params(model)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """A batch (tensor, dict, tuple, list) with every tensor moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call(model: Any, batch: Any, **extra: Any) -> Any:
    """Call ``model`` on one batch: dicts are keyword args, tuples/lists positional, else one arg."""
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``model``, each tied tensor once."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_params(model: Any) -> int:
    """Number of parameter elements, tied tensors counted once (0 for a non-module)."""
    if not isinstance(model, nn.Module):
        return 0
    return sum(p.numel() for p in unique_params(model))


def numel_by_name(model: nn.Module) -> dict[str, int]:
    """Parameter FQN -> number of elements, one entry per distinct tensor (the first name)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p.numel()
    return out


def get_tensor(root: nn.Module, fqn: str) -> torch.Tensor | None:
    """The parameter or buffer at ``fqn`` (None when the path does not name a tensor)."""
    obj: Any = root
    for part in fqn.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def set_tensor(root: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``fqn`` as a Parameter, a buffer or a plain attribute, as the old one was."""
    mod_path, _, attr = fqn.rpartition(".")
    mod = root.get_submodule(mod_path) if mod_path else root
    old = getattr(mod, attr, None)
    if isinstance(old, nn.Parameter) or attr in mod._parameters:
        req = old.requires_grad if isinstance(old, nn.Parameter) else True
        mod._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=req)
    elif attr in mod._buffers:
        mod._buffers[attr] = value.detach() if isinstance(value, nn.Parameter) else value
    else:
        setattr(mod, attr, value)
