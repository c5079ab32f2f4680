"""Save and load pruned models without pickles: safetensors weights + JSON.

``save`` writes ``model.safetensors``, the HF ``config.json`` when there is one, and
``fxprune.json``: the model class, the *original* config, every tensor's new shape and the int
attributes the rewrite changed.  ``load`` rebuilds the original skeleton on the meta device,
shrinks it to those shapes, sets the attributes and loads the weights, so a non-uniformly pruned
model (layers of different widths) comes back as the user's own class.  A uniformly pruned HF
model also gets an updated ``config.json`` and loads with plain ``from_pretrained``.

Writes go through :class:`fxprune.util.publish.Publication`: a temporary directory next to the
target, renamed into place at the end, so an interrupted save never leaves a half-written model.
An existing target is refused unless ``overwrite=True``, and a target that is, contains or lies
inside one of the ``protect`` paths (the source checkpoint) is always refused.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Iterable

import torch

from fxprune.errors import FxpruneError
from fxprune.util.publish import publish_dir

FORMAT_VERSION = 1


def _unpack(model_or_result: Any) -> tuple[Any, Any]:
    """(model, RewriteResult or None) from a module, a RewriteResult or a PruneResult."""
    rewrite = getattr(model_or_result, "rewrite", None)
    if rewrite is not None and hasattr(rewrite, "attribute_changes"):  # PruneResult
        return rewrite.model, rewrite
    if hasattr(model_or_result, "attribute_changes") and hasattr(model_or_result, "model"):  # RewriteResult
        return model_or_result.model, model_or_result
    if hasattr(model_or_result, "model") and isinstance(model_or_result.model, torch.nn.Module):
        return model_or_result.model, None  # a PruneResult whose plan removed nothing
    return model_or_result, None


def save(model_or_result: Any, directory: str, *, overwrite: bool = False,
         protect: Iterable[str] = ()) -> str:
    """Write a pruned (or any) model to ``directory`` as safetensors + JSON.

    Pass the :class:`~fxprune.passes.rewrite.RewriteResult` (or the ``PruneResult``) rather than
    the bare module, so the per-layer attributes the rewrite set are recorded for ``load``.
    """
    with publish_dir(directory, overwrite=overwrite, protect=protect) as tmp:
        save_into(model_or_result, str(tmp))
    return os.path.abspath(directory)


def save_into(model_or_result: Any, tmp: str, extra: dict | None = None) -> None:
    """Write the model files into an existing (temporary) directory; ``save`` publishes it."""
    from safetensors.torch import save_file

    model, info = _unpack(model_or_result)
    if not isinstance(model, torch.nn.Module):
        raise FxpruneError(f"save() needs an nn.Module or a rewrite result, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):
        raise FxpruneError(
            "this pruned model is a rewritten GraphModule (the eager class could not express it); "
            "export it with fxprune.export_onnx, or prune with kinds the class supports"
        )
    state = _dedup_state(model)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "shapes": {n: list(t.shape) for n, t in model.state_dict().items()},
        "attributes": _attr_changes(info),
        "config_updated": bool(getattr(info, "config_updated", False)),
        "tied": _tied_names(model),
    }
    depth = getattr(info, "depth", None)
    if depth is not None and depth.changed:  # deleted layers and zeroed branches, redone by load
        record["depth"] = depth.to_json()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.save_pretrained(tmp)
        # the config the skeleton is built from: already pruned when the rewrite could
        # express the result as a config (uniform pruning), else the original
        record["original_config"] = config.to_dict()
    record.update(extra or {})
    with open(os.path.join(tmp, "fxprune.json"), "w") as f:
        json.dump(record, f, indent=1)


def load(directory: str, model_class: Any = None, *, config: Any = None, device: str = "cpu") -> torch.nn.Module:
    """Rebuild a model saved by ``save``.

    ``model_class`` is the class (or a zero-argument factory) to rebuild; for HF models it can be
    omitted (the class recorded at save time is imported).  ``config`` overrides the recorded
    original config.
    """
    from safetensors.torch import load_file

    path = os.path.join(directory, "fxprune.json")
    if not os.path.exists(path):
        raise FxpruneError(f"{directory} has no fxprune.json; was it written by fxprune.save?")
    with open(path) as f:
        record = json.load(f)
    cls = model_class or _import(record["class"])
    skeleton = _build_skeleton(cls, record, config)
    if record.get("depth"):
        from fxprune.passes.depth import apply_recorded

        apply_recorded(skeleton, record["depth"])
    _shrink_skeleton(skeleton, record)
    state = load_file(os.path.join(directory, "model.safetensors"), device=device)
    for key in [k for k in state if k.startswith(_BUFFER_PREFIX)]:
        name = key[len(_BUFFER_PREFIX):]
        mod_path, _, attr = name.rpartition(".")
        mod = skeleton.get_submodule(mod_path) if mod_path else skeleton
        mod._buffers[attr] = state.pop(key)
    for name, alias in record.get("tied", {}).items():
        if alias in state and name not in state:
            state[name] = state[alias]
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m not in record.get("tied", {})]
    if unexpected or missing:
        raise FxpruneError(f"weights do not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(skeleton, "tie_weights") and record.get("tied"):
        try:
            skeleton.tie_weights()
        except Exception:  # noqa: BLE001
            pass
    _materialise_meta(skeleton, device)
    return skeleton.eval()


def _build_skeleton(cls: Any, record: dict, config: Any) -> torch.nn.Module:
    original = config if config is not None else record.get("original_config")
    with torch.device("meta"):
        if original is not None and hasattr(cls, "config_class") and hasattr(cls, "_from_config"):
            cfg = original if not isinstance(original, dict) else cls.config_class.from_dict(original)
            return cls._from_config(cfg)
        if original is not None and not isinstance(original, dict):
            return cls(original)
        return cls()


def _shrink_skeleton(model: torch.nn.Module, record: dict) -> None:
    from fxprune.passes.rewrite import _fix_module

    shapes = record["shapes"]
    touched = set()
    for name, shape in shapes.items():
        mod_path, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_path) if mod_path else model
        old = getattr(mod, attr, None)
        if not isinstance(old, torch.Tensor) or list(old.shape) == list(shape):
            continue
        new = torch.empty(shape, dtype=old.dtype, device="meta")
        if isinstance(old, torch.nn.Parameter):
            mod._parameters[attr] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            mod._buffers[attr] = new
        touched.add(mod_path)
    for mp in touched:
        _fix_module(model.get_submodule(mp) if mp else model)
    for mod_path, attrs in record.get("attributes", {}).items():
        mod = model.get_submodule(mod_path) if mod_path else model
        for attr, value in attrs.items():
            setattr(mod, attr, value)


def _materialise_meta(model: torch.nn.Module, device: str) -> None:
    """Non-persistent buffers (RoPE inv_freq...) are not saved: recompute them on device."""
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":
            raise FxpruneError(
                f"buffer {name} was not saved and cannot be rebuilt; save the model with persistent buffers"
            )


_BUFFER_PREFIX = "__nonpersistent__."


def _dedup_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():
        if name not in persistent and buf is not None:  # RoPE inv_freq and friends
            state[_BUFFER_PREFIX + name] = buf.detach().contiguous().cpu()
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen and t.numel():
            continue
        seen[key] = name
        state[name] = t.detach().contiguous().cpu()
    return state


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel():
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def _attr_changes(info: Any) -> dict[str, dict[str, int]]:
    if info is None:
        return {}
    return {mp: {a: new for a, (_, new) in attrs.items()} for mp, attrs in info.attribute_changes.items()}


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise FxpruneError(f"cannot import model class {path}; pass model_class= to load()") from exc
