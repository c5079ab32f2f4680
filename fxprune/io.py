"""Save and load pruned models without pickles: safetensors weights + JSON.

``save_into`` writes ``model.safetensors`` (persistent tensors only: non-persistent buffers such
as RoPE ``inv_freq`` are rebuilt by whoever loads the model) and ``fxprune.json``: the model
class, the config its skeleton is built from, every tensor's shape, the int attributes and
per-module config fields a config alone does not set.  ``load`` builds that skeleton with its
parameters on the meta device (buffers are computed as the class computes them), shrinks it to
the recorded shapes, sets the attributes and loads the weights, so a non-uniformly pruned model
(layers of different widths) comes back as the user's own class.  A non-persistent buffer that
the class would not rebuild as it was (a RoPE table sliced by head_dim pruning) goes to
``fxprune_buffers.safetensors``, which only ``load`` reads.

The HF side of a checkpoint directory (``config.json``, the modeling file for per-layer widths,
tokenizer and sentence-transformers files, the model card) is :mod:`fxprune.checkpoint`'s job;
``save`` publishes a whole directory through it.

Writes go through :class:`fxprune.util.publish.Publication`: a temporary directory next to the
target, renamed into place at the end, so an interrupted save never leaves a half-written model.
An existing target is refused unless ``overwrite=True``, and a target that is, contains or lies
inside one of the ``protect`` paths (the source checkpoint) is always refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import types
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from fxprune.errors import FxpruneError, ModelLoadError
from fxprune.util import hf
from fxprune.util.publish import note_input, publish_dir

FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
BUFFERS = "fxprune_buffers.safetensors"
RECORD = "fxprune.json"


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


def save(model_or_result: Any, directory: str, *, overwrite: bool = False, protect: Iterable[str] = (),
         source: str | None = None, tokenizer: Any = None, quality: Mapping[str, Any] | None = None) -> str:
    """Write a pruned (or any) model to ``directory``: a checkpoint its own stack loads.

    Pass the ``PruneResult`` (or the :class:`~fxprune.passes.rewrite.RewriteResult`) rather than
    the bare module, so the model card can say what was pruned.  ``source`` is the checkpoint
    directory the model came from: its tokenizer, ``generation_config.json`` and
    sentence-transformers files are carried over (see :func:`fxprune.checkpoint.write_checkpoint`).
    ``source`` is always protected from being written over.

    ``directory`` may never be, contain or lie inside an input, even with ``overwrite=True``:
    the ``protect`` paths, ``source``, the local checkpoint the model was loaded from (its HF
    ``name_or_path``) and every file fxprune read in this process.
    """
    from fxprune.checkpoint import write_checkpoint

    model, _ = _unpack(model_or_result)
    protect = [*protect, *([source] if source else []), *_sources_of(model)]
    with publish_dir(directory, overwrite=overwrite, protect=protect) as tmp:
        write_checkpoint(model_or_result, str(tmp), source=source, tokenizer=tokenizer, quality=quality)
    return os.path.abspath(directory)


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """What :func:`save_into` wrote: the record (``fxprune.json``) and what a skeleton lacks."""

    record: dict[str, Any]
    standard: bool  # an HF class whose config alone rebuilds it (plain from_pretrained works)
    extra_buffers: tuple[str, ...]  # non-persistent buffers the class would not rebuild as they are
    changed_shapes: dict[str, list[int]]  # state-dict shapes that differ from the config's skeleton
    depth_code: bool = False  # recorded depth pruning the config's skeleton does not have by itself


def _sources_of(model: Any) -> list[str]:
    """Local paths a model was loaded from (HF ``name_or_path``), to be protected from outputs."""
    out = []
    for cand in (getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if isinstance(cand, str) and cand and os.path.exists(cand):
            out.append(cand)
    return out


def save_into(model_or_result: Any, tmp: str, extra: dict | None = None) -> SavedModel:
    """Write ``model.safetensors`` and ``fxprune.json`` into an existing (temporary) directory.

    ``save`` publishes the directory; :func:`fxprune.checkpoint.write_checkpoint` adds the HF files.
    """
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
    save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    return _write_record(model, info, _tied_names(model), tmp, extra)


def _write_record(model: torch.nn.Module, info: Any, tied: dict[str, str], tmp: str,
                  extra: dict | None) -> SavedModel:
    """``fxprune.json`` describing ``model``'s skeleton for ``load`` (the HF files are
    :func:`fxprune.checkpoint.write_checkpoint`'s), and what a skeleton built from its config lacks."""
    from safetensors.torch import save_file

    config = hf.config_of(model)
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "shapes": {n: list(t.shape) for n, t in model.state_dict().items()},
        "attributes": _attr_changes(info),
        "module_configs": {},
        "config_updated": bool(getattr(info, "config_updated", False)),
        "tied": tied,
    }
    depth = getattr(info, "depth", None)
    if depth is not None and depth.changed:  # deleted layers and zeroed branches, redone by load
        record["depth"] = depth.to_json()
    if config is not None:
        # the config the skeleton is built from: already pruned when the rewrite could express
        # the result as a config (uniform pruning), else the original
        record["original_config"] = config.to_dict()
        record["module_configs"] = {p: hf.config_diff(c, config) for p, c in hf.module_configs(model).items()}
    skeleton, dense_shapes, depth_code = _reference(type(model), record)
    changed: dict[str, list[int]] = {}
    extra_buffers: list[str] = []
    if skeleton is not None:  # what the rebuilt class does not set by itself (else: the rewrite's changes)
        record["attributes"] = hf.int_attr_diff(model, skeleton)
        changed = {n: s for n, s in record["shapes"].items() if dense_shapes.get(n) != tuple(s)}
        extra_buffers = _unreproducible_buffers(model, skeleton)
    else:
        extra_buffers = [n for n, _ in _nonpersistent_buffers(model)]
    if extra_buffers:
        buffers = dict(_nonpersistent_buffers(model))
        save_file({n: buffers[n].detach().contiguous().cpu() for n in extra_buffers},
                  os.path.join(tmp, BUFFERS), metadata={"format": "pt"})
        record["buffers"] = extra_buffers
    standard = (config is not None and skeleton is not None and not changed and not record["attributes"]
                and not any(record["module_configs"].values()) and not extra_buffers and not depth_code)
    record.update(extra or {})
    with open(os.path.join(tmp, RECORD), "w") as f:
        json.dump(record, f, indent=1)
    return SavedModel(record, standard, tuple(extra_buffers), changed, depth_code)


def read_record(directory: str) -> dict[str, Any]:
    """The ``fxprune.json`` of a saved directory (ModelLoadError naming what is missing or malformed)."""
    path = os.path.join(directory, RECORD)
    if not os.path.isdir(directory):
        raise ModelLoadError(f"model directory {directory} does not exist")
    if not os.path.exists(path):
        raise ModelLoadError(f"{directory} has no {RECORD}; was it written by fxprune.save?")
    record = _read_json(path)
    if not isinstance(record, dict) or "class" not in record or "shapes" not in record:
        raise ModelLoadError(f"{path} is not an fxprune record (no 'class'/'shapes'); was it written by fxprune.save?")
    return record


def load(directory: str, model_class: Any = None, *, config: Any = None, device: str = "cpu") -> torch.nn.Module:
    """Rebuild a model saved by ``save``.

    ``model_class`` is the class (or a zero-argument factory) to rebuild; for HF models it can be
    omitted (the class recorded at save time is imported).  ``config`` overrides the recorded
    original config.  Weights are one ``model.safetensors`` or shards with an index;
    ``device="meta"`` reads only their headers (shapes and dtypes, no weight bytes).  A missing,
    truncated or malformed file raises :class:`~fxprune.errors.ModelLoadError` naming it; the
    directory is recorded as an input (no later output of this process may replace it).
    """
    record = read_record(directory)
    weights = os.path.join(directory, WEIGHTS)
    if os.path.exists(weights):
        check_safetensors(weights)
    note_input(directory)
    cls = model_class or _import(record["class"])
    skeleton = rebuild(cls, record, config)
    try:
        state = Checkpoint.open(directory).state(device)
    except FxpruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - named, one line
        raise ModelLoadError(f"the weights in {directory} cannot be read: {exc}") from None
    for key in [k for k in state if k.startswith(_BUFFER_PREFIX)]:  # format 1 saved them with the weights
        _set_buffer(skeleton, key[len(_BUFFER_PREFIX):], state.pop(key))
    if record.get("buffers"):
        from safetensors.torch import load_file

        for name, value in load_file(os.path.join(directory, BUFFERS), device=str(device)).items():
            _set_buffer(skeleton, name, value)
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


def rebuild(cls: Any, record: Mapping[str, Any], config: Any = None) -> torch.nn.Module:
    """The recorded model without its weights: parameters on meta, buffers computed, shapes,
    int attributes and per-module config fields as recorded."""
    try:
        skeleton = _build_skeleton(cls, record, config)
    except Exception as exc:  # noqa: BLE001 - the class refuses its own recorded config
        raise FxpruneError(
            f"{getattr(cls, '__name__', cls)} cannot be built from the recorded config ({type(exc).__name__}: {exc}); "
            "pass config= (or model_class=) to load()"
        ) from exc
    _apply_depth(skeleton, record)
    _shrink_skeleton(skeleton, record)
    return skeleton


def _apply_depth(skeleton: torch.nn.Module, record: Mapping[str, Any]) -> bool:
    """Redo recorded depth pruning (deleted layers, zeroed branches) on a skeleton; True when the
    class built from the config needed it (then no standard config describes the model)."""
    if not record.get("depth"):
        return False
    from fxprune.passes.depth import apply_recorded

    return apply_recorded(skeleton, record["depth"])


def _reference(cls: Any, record: Mapping[str, Any]) -> tuple[torch.nn.Module | None, dict[str, tuple], bool]:
    """(skeleton as ``load`` rebuilds it, the unshrunk skeleton's shapes, whether recorded depth
    pruning had to be redone on it), or (None, {}, False) when the class cannot be rebuilt without
    help (a factory with arguments)."""
    try:
        dense = _build_skeleton(cls, record, None)
    except Exception:  # noqa: BLE001 - load() needs model_class= then; nothing to compare with
        return None, {}, False
    depth_code = _apply_depth(dense, record)
    shapes = hf.state_shapes(dense)
    _shrink_skeleton(dense, {**record, "attributes": {}})
    return dense, shapes, depth_code


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers computed.

    Like ``accelerate.init_empty_weights(include_buffers=False)``: a parameter moves to meta as it
    is registered, so no weights are allocated, while buffers (RoPE frequencies, position ids)
    are computed as the class computes them and need not be saved.
    """
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------
# Checking model files before loading them
# ------------------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror or exc}") from None


def check_safetensors(path: str) -> None:
    """A safetensors file whose header parses and whose tensors all lie inside the file.

    Reads only the header: a truncated download or a partly copied file is caught by name
    before any weight is loaded.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"weights file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"weights file {path} is not readable (permissions)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"weights file {path} is truncated or empty ({size} bytes): not a safetensors file")
        n = int.from_bytes(head, "little")
        if n <= 1 or 8 + n > size:
            raise ModelLoadError(
                f"weights file {path} is truncated or not a safetensors file (its header claims {n} bytes, "
                f"the file has {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(f"weights file {path} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"weights file {path} is corrupt: its safetensors header is not a JSON object")
    data = size - 8 - n
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if end > data:
        raise ModelLoadError(
            f"weights file {path} is truncated: its tensors need {end:,} bytes of data, the file holds {data:,} "
            "(an interrupted download or copy?)")


def _check_torch_bin(path: str) -> None:
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(f"weights file {path} is empty")
    with open(path, "rb") as f:
        magic = f.read(2)
        if magic == b"PK":  # torch.save's zip format: the end-of-central-directory record must be there
            f.seek(max(0, size - 65557))
            if b"PK\x05\x06" not in f.read():
                raise ModelLoadError(f"weights file {path} is truncated (its zip directory is missing)")


def check_model_dir(path: str) -> str:
    """Everything about a model directory that can be checked without loading it.

    Returns ``"fxprune"`` (written by fxprune.save) or ``"hf"`` (a Hugging Face checkpoint).
    Raises ModelLoadError naming the missing or malformed file.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} does not exist")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path {path} is a file; pass the model directory (with config.json)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelLoadError(f"model directory {path} is not readable (permissions)")
    record = os.path.join(path, "fxprune.json")
    config = os.path.join(path, "config.json")
    if os.path.exists(record):
        _read_json(record)
        check_safetensors(os.path.join(path, "model.safetensors"))
        return "fxprune"
    if not os.path.exists(config):
        raise ModelLoadError(
            f"{path} has no config.json: not a Hugging Face model directory (expected config.json and "
            "model.safetensors, or a directory written by fxprune)")
    cfg = _read_json(config)
    if not isinstance(cfg, dict) or not (cfg.get("model_type") or cfg.get("architectures")):
        raise ModelLoadError(f"{config} has neither 'model_type' nor 'architectures': not a transformers config")
    present = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        raise ModelLoadError(f"{path} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})")
    for name in present:
        full = os.path.join(path, name)
        if name.endswith(".index.json"):
            index = _read_json(full)
            shards = sorted(set((index or {}).get("weight_map", {}).values())) if isinstance(index, dict) else []
            if not shards:
                raise ModelLoadError(f"{full} has no weight_map")
            for shard in shards:
                sp = os.path.join(path, shard)
                if not os.path.exists(sp):
                    raise ModelLoadError(f"weights shard {sp} (listed in {name}) does not exist")
                check_safetensors(sp) if shard.endswith(".safetensors") else _check_torch_bin(sp)
        elif name.endswith(".safetensors"):
            check_safetensors(full)
        else:
            _check_torch_bin(full)
    return "hf"


def _build_skeleton(cls: Any, record: Mapping[str, Any], config: Any) -> torch.nn.Module:
    original = config if config is not None else record.get("original_config")
    with _params_on_meta():
        if original is not None and hasattr(cls, "config_class") and hasattr(cls, "_from_config"):
            cfg = original if not isinstance(original, dict) else cls.config_class.from_dict(original)
            return cls._from_config(cfg)
        if original is not None and not isinstance(original, dict):
            return cls(original)
        return cls()


def _shrink_skeleton(model: torch.nn.Module, record: Mapping[str, Any]) -> None:
    from fxprune.passes.rewrite import _fix_module

    shapes = record["shapes"]
    touched = set()
    for name, shape in shapes.items():
        mod_path, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_path) if mod_path else model
        old = getattr(mod, attr, None)
        if old is None and mod._parameters.get(attr, False) is None:  # a bias an update added (flap)
            like = next(iter(mod.parameters(recurse=False)), None)
            if like is not None:
                mod._parameters[attr] = torch.nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device))
            continue
        if not isinstance(old, torch.Tensor) or list(old.shape) == list(shape):
            continue
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
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
    root = hf.config_of(model)
    for mod_path, fields in record.get("module_configs", {}).items():
        if root is not None and fields:
            model.get_submodule(mod_path).config = hf.copy_config(root, fields)


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    mod._buffers[attr] = value


def _materialise_meta(model: torch.nn.Module, device: str) -> None:
    """Every tensor must be real after loading (unless loading on meta); computed buffers follow
    the weights' device."""
    if str(device) == "meta":
        return
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise FxpruneError(f"{name} was neither saved nor rebuilt by its class; it cannot be loaded")
    for name, buf in list(model.named_buffers()):
        if buf.device != torch.device(device):
            _set_buffer(model, name, buf.to(device))


_BUFFER_PREFIX = "__nonpersistent__."


def _nonpersistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    persistent = set(model.state_dict().keys())
    return [(n, b) for n, b in model.named_buffers() if n not in persistent and b is not None]


def _unreproducible_buffers(model: torch.nn.Module, skeleton: torch.nn.Module) -> list[str]:
    """Non-persistent buffers of ``model`` that ``skeleton`` (as load rebuilds it) lacks or
    computes differently: those must be saved."""
    rebuilt = dict(skeleton.named_buffers())
    out = []
    for name, buf in _nonpersistent_buffers(model):
        ref = rebuilt.get(name)
        if ref is None or ref.device.type == "meta" or ref.shape != buf.shape or not torch.equal(
            ref.to(device=buf.device, dtype=buf.dtype), buf
        ):
            out.append(name)
    return out


def _dedup_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent tensors, each once (a tied weight is saved under its first name)."""
    state = {}
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


# ------------------------------------------------------------------------------------------
# Checkpoints tensor by tensor: lazy reading, and shard-by-shard writing (sequential mode)
# ------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The safetensors weights of a model directory, read lazily.

    Opening reads only the headers (name -> file, shape, dtype).  :meth:`read` memory-maps the
    files (``safetensors.safe_open``) and copies out just the tensors asked for, so a caller
    that reads one block at a time holds one block, never the checkpoint.
    """

    directory: str
    files: Mapping[str, str]  # tensor name -> absolute file path
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype]

    @classmethod
    def open(cls, directory: str) -> "Checkpoint":
        from safetensors import safe_open

        index = os.path.join(directory, INDEX_NAME)
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            paths = sorted({os.path.join(directory, v) for v in weight_map.values()})
        elif os.path.exists(single):
            paths = [single]
        else:
            paths = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not paths:
            raise ModelLoadError(f"{directory} has no safetensors weights (model.safetensors or {INDEX_NAME})")
        files: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, torch.dtype] = {}
        for path in paths:
            if not os.path.exists(path):
                raise ModelLoadError(f"{path} is listed in {INDEX_NAME} but does not exist")
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        files[name], shapes[name] = path, tuple(sl.get_shape())
                        dtypes[name] = SAFETENSORS_DTYPES[sl.get_dtype()]
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"cannot read the safetensors header of {path}: {exc}") from exc
        return cls(os.path.abspath(directory), types.MappingProxyType(files), types.MappingProxyType(shapes),
                   types.MappingProxyType(dtypes))

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of the named tensors (all of them by default) as stored."""
        chosen = self.files if names is None else [n for n in names if n in self.files]
        return sum(math.prod(self.shapes[n]) * _itemsize(self.dtypes[n]) for n in chosen)

    def read(self, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, copied out of the memory-mapped files onto ``device``."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise ModelLoadError(f"{self.directory} has no tensor {n!r}")
            by_file.setdefault(self.files[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        dev = str(device)
        for path, group in by_file.items():
            with safe_open(path, framework="pt", device=dev if dev != "meta" else "cpu") as f:
                for n in group:
                    out[n] = f.get_tensor(n) if dev != "meta" else torch.empty(self.shapes[n], dtype=self.dtypes[n],
                                                                                  device="meta")
        return out

    def state(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor (``device="meta"``: shapes and dtypes only)."""
        if str(device) == "meta":
            return {n: torch.empty(s, dtype=self.dtypes[n], device="meta") for n, s in self.shapes.items()}
        return self.read(self.files, device)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Write safetensors shards tensor by tensor, never holding a shard in memory.

    Every name, shape and dtype is known before the first byte (sequential mode plans the pruned
    shapes on meta), so each shard's header is written first and each tensor is then written at
    its offset as it comes.  More than one shard: ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json`` (the Hugging Face layout); one shard: ``model.safetensors``.
    """

    def __init__(self, directory: str, entries: Sequence[tuple[str, Sequence[int], torch.dtype]], *,
                 max_shard_bytes: int = 5 * 10**9) -> None:
        self.directory = directory
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            if dtype not in _DTYPE_CODES:
                raise FxpruneError(f"cannot write {name}: dtype {dtype} has no safetensors code")
            nbytes = math.prod(shape) * _itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(int(d) for d in shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.file_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[str, tuple[int, int, int, tuple[int, ...], torch.dtype]] = {}  # name -> shard, start, end
        self._headers: list[bytes] = []
        self._sizes: list[int] = []
        for i, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self._where[name] = (i, offset, offset + nbytes, shape, dtype)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self._headers.append(raw)
            self._sizes.append(offset)
        self._files: dict[int, Any] = {}
        self._written: set[str] = set()
        self.total_bytes = sum(self._sizes)

    def _file(self, i: int) -> Any:
        f = self._files.get(i)
        if f is None:
            f = self._files[i] = open(os.path.join(self.directory, self.file_names[i]), "wb+")
            f.write(len(self._headers[i]).to_bytes(8, "little"))
            f.write(self._headers[i])
            f.truncate(8 + len(self._headers[i]) + self._sizes[i])
        return f

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` as ``name`` (its shape and dtype must be the planned ones)."""
        if name not in self._where:
            raise FxpruneError(f"{name} was not planned for this checkpoint")
        i, start, end, shape, dtype = self._where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise FxpruneError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._file(i)
        f.seek(8 + len(self._headers[i]) + start)
        f.write(memoryview(data))
        self._written.add(name)

    def abort(self) -> None:
        """Close the open shards without finishing them (the caller discards the directory)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def close(self) -> list[str]:
        """Finish every shard (and the index); returns the file names.  All tensors must be written."""
        missing = sorted(set(self._where) - self._written)
        for i in range(len(self.file_names)):
            self._file(i)  # a shard whose tensors are all empty still gets its header
        for f in self._files.values():
            f.close()
        self._files.clear()
        if missing:
            raise FxpruneError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: self.file_names[w[0]] for n, w in sorted(self._where.items())}}
            with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=1)
            return [*self.file_names, INDEX_NAME]
        return list(self.file_names)


def save_streamed_into(model: torch.nn.Module, info: Any, tmp: str, tensors: Iterable[tuple[str, torch.Tensor]],
                       entries: Sequence[tuple[str, Sequence[int], torch.dtype]], *, tied: Mapping[str, str],
                       max_shard_bytes: int = 5 * 10**9, extra: dict | None = None) -> "SavedModel":
    """``save_into`` for a model whose weights never sit in memory together (sequential mode).

    ``model`` is the pruned skeleton (parameters may be on meta) that ``load`` rebuilds;
    ``entries`` lists every tensor of the state dict to write (name, shape, dtype, in write
    order), ``tensors`` yields them one by one, and ``tied`` maps each tied alias to the name
    written; non-persistent buffers the class would not rebuild go to their own file, as ``save``
    writes them.  Returns what
    :func:`save_into` returns (:func:`fxprune.checkpoint.write_checkpoint` takes it from there).
    """
    writer = ShardedWriter(tmp, entries, max_shard_bytes=max_shard_bytes)
    try:
        for name, t in tensors:
            writer.write(name, t)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    saved = _write_record(model, info, dict(tied), tmp, extra)
    config = hf.config_of(model)
    if config is not None:
        config.save_pretrained(tmp)
    return saved
