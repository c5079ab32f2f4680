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

import dataclasses
import importlib
import json
import math
import os
import types
from typing import Any, Iterable, Mapping, Sequence

import torch

from fxprune.errors import FxpruneError, ModelLoadError
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
    _write_record(model, info, _tied_names(model), tmp, extra)


def _write_record(model: torch.nn.Module, info: Any, tied: dict[str, str], tmp: str, extra: dict | None) -> None:
    """``fxprune.json`` (and the HF ``config.json``) describing ``model``'s skeleton for ``load``."""
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "shapes": {n: list(t.shape) for n, t in model.state_dict().items()},
        "attributes": _attr_changes(info),
        "config_updated": bool(getattr(info, "config_updated", False)),
        "tied": tied,
    }
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
    original config.  Weights are one ``model.safetensors`` or shards with an index;
    ``device="meta"`` reads only their headers (shapes and dtypes, no weight bytes).
    """
    path = os.path.join(directory, "fxprune.json")
    if not os.path.exists(path):
        raise FxpruneError(f"{directory} has no fxprune.json; was it written by fxprune.save?")
    with open(path) as f:
        record = json.load(f)
    cls = model_class or _import(record["class"])
    skeleton = _build_skeleton(cls, record, config)
    _shrink_skeleton(skeleton, record)
    state = Checkpoint.open(directory).state(device)
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
        if buf.device.type == "meta" and str(device) != "meta":
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
                       max_shard_bytes: int = 5 * 10**9, extra: dict | None = None) -> list[str]:
    """``save_into`` for a model whose weights never sit in memory together (sequential mode).

    ``model`` is the pruned skeleton (parameters may be on meta) that ``load`` rebuilds;
    ``entries`` lists every tensor to write (name, shape, dtype, in write order), ``tensors``
    yields them one by one (non-persistent buffers under ``__nonpersistent__.NAME`` as ``save``
    writes them), and ``tied`` maps each tied alias to the name written.  Returns the weight files.
    """
    writer = ShardedWriter(tmp, entries, max_shard_bytes=max_shard_bytes)
    try:
        for name, t in tensors:
            writer.write(name, t)
    except BaseException:
        writer.abort()
        raise
    files = writer.close()
    _write_record(model, info, dict(tied), tmp, extra)
    return files
