"""Export a (pruned) model to ONNX, check it in ONNX Runtime, decode and time it there.

Why this pass exists: a structurally pruned model is only worth something if the smaller shapes
reach the runtime that serves it.  This module turns the user's eager module (or a
``torch.export.ExportedProgram``) into an ONNX file with dynamic batch and sequence axes, proves
the file computes what PyTorch computes at shapes *other* than the ones it was traced with (a
specialised shape is the classic silent export bug), and, for decoder LMs, exports a decoder with
an explicit KV cache so that generation and latency can be measured in ONNX Runtime.

Public entry points: :func:`export_onnx`, :func:`onnx_generate`, :func:`benchmark_latency`,
:func:`ort_providers`.

KV-cache I/O names follow Optimum / onnxruntime-genai: inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key`` / ``.value``; outputs ``logits``,
``present.{i}.key`` / ``.value``.  Cache tensors are ``[batch, kv_heads_i, seq, head_dim_i]``;
``kv_heads_i`` and ``head_dim_i`` are read per layer from the modules, because a pruned model may
keep a different number of KV heads in every layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from fxprune.errors import FxpruneError, OutputExistsError, VerificationError

__all__ = [
    "ExportResult",
    "LatencyResult",
    "export_onnx",
    "onnx_generate",
    "benchmark_latency",
    "ort_providers",
    "kv_cache_layout",
]

#: Above this many bytes of weights the ONNX file keeps its initializers in a side file.  The hard
#: protobuf limit is 2 GiB; staying well under it leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024**3)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well it matched PyTorch.

    ``max_abs_diff`` is measured at ``check_shapes`` (deliberately not the export shapes) and is
    ``None`` when ``check=False``.  ``file_size`` counts the ``.onnx`` file plus any external data.
    """

    path: Path
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float | None
    providers: list[str]
    file_size: int
    external_data: bool = False
    check_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LatencyResult:
    """Median latencies from :func:`benchmark_latency` (milliseconds) plus the raw samples."""

    prefill_ms: float
    decode_ms_per_token: float
    provider: str
    batch_size: int
    prompt_len: int
    decode_tokens: int
    io_binding: bool
    prefill_samples_ms: list[float] = dataclasses.field(default_factory=list)
    decode_samples_ms: list[float] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Providers and sessions
# --------------------------------------------------------------------------------------------


def _import_ort():
    """Import onnxruntime lazily so that fxprune imports without the ``onnx`` extra."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FxpruneError(
            "onnxruntime is not installed; install fxprune[onnx] (or onnxruntime-gpu for CUDA)"
        ) from exc
    return ort


def _cuda_usable(ort) -> bool:
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
    ort = _import_ort()
    device = device.lower()
    if device not in ("auto", "cpu", "cuda"):
        raise FxpruneError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if _cuda_usable(ort):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise FxpruneError(
            "device='cuda' but ONNX Runtime cannot use a GPU here "
            f"(available providers: {ort.get_available_providers()}, "
            f"torch.cuda.is_available()={torch.cuda.is_available()}); install onnxruntime-gpu"
        )
    return ["CPUExecutionProvider"]


def _session(session_or_path: Any, providers: Sequence[str] | None):
    """Accept a ready InferenceSession or a path, so helpers compose with :func:`export_onnx`."""
    ort = _import_ort()
    if isinstance(session_or_path, ort.InferenceSession):
        return session_or_path
    if isinstance(session_or_path, ExportResult):
        session_or_path = session_or_path.path
    path = Path(session_or_path)
    if not path.is_file():
        raise FxpruneError(f"ONNX file not found: {path}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # keep ORT's warnings about unused initializers out of the way
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ort_providers()))


# --------------------------------------------------------------------------------------------
# Small tensor helpers
# --------------------------------------------------------------------------------------------


def _is_int(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex


def _default_dynamic_dims(name: str, t: torch.Tensor) -> dict[int, str]:
    """Which dims of an example input vary at run time, by the documented convention.

    Every input of rank >= 1 has a dynamic batch (dim 0); 2-D integer tensors (token ids, masks,
    token types, positions) also have a dynamic sequence (dim 1).  Images and other float inputs
    only vary in batch, since their spatial size is usually part of the architecture.
    """
    dims: dict[int, str] = {}
    if t.dim() >= 1:
        dims[0] = "batch"
    if t.dim() == 2 and _is_int(t):
        dims[1] = "seq"
    return dims


def _enlarge(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Double any size-1 dynamic dim by repeating the data.

    torch.export specialises dims of size 0/1, so a batch-1 example would silently produce a
    batch-1 model.  Repeating keeps the user's real values (masks, ids) instead of inventing some.
    """
    for d in dims:
        if t.shape[d] == 1:
            t = torch.cat([t, t], dim=d)
    return t


def _fresh_like(name: str, t: torch.Tensor, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """A new tensor of ``shape`` with values of the same kind as ``t``.

    Integer inputs draw from the example's own value range (so ids stay < vocab and an all-ones
    mask stays all ones); masks are all ones to avoid fully masked rows, whose NaNs would make the
    comparison meaningless.
    """
    shape = tuple(int(s) for s in shape)
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if _is_int(t):
        if "mask" in name and t.numel() and int(t.min()) >= 0 and int(t.max()) <= 1:
            return torch.ones(shape, dtype=t.dtype)
        lo = int(t.min()) if t.numel() else 0
        hi = int(t.max()) if t.numel() else 1
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(t.dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype)


def _leaf_name(path: tuple) -> str:
    """Readable output name from a pytree key path (``logits``, ``output_0``, ``hidden.1``)."""
    parts = []
    for entry in path:
        if isinstance(entry, pytree.MappingKey):
            parts.append(str(entry.key))
        elif isinstance(entry, pytree.GetAttrKey):
            parts.append(str(entry.name))
        elif isinstance(entry, pytree.SequenceKey):
            parts.append(str(entry.idx))
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _tensor_leaves(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Flatten a model output (tensor, tuple, dict, HF ModelOutput) to named tensor leaves."""
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    try:
        leaves = pytree.tree_leaves_with_path(out)
    except Exception:  # unregistered container: fall back to its visible tensors
        leaves = [((pytree.SequenceKey(i),), v) for i, v in enumerate(out)]
    names, tensors = [], []
    for path, value in leaves:
        if isinstance(value, torch.Tensor):
            name = _leaf_name(path)
            names.append(f"output_{name}" if name.isdigit() or not name else name)
            tensors.append(value)
    return names, tensors


def _weights_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of distinct storages, so tied embeddings are not counted twice."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put a module in eval mode for tracing and restore each submodule's flag afterwards.

    Export needs eval-mode BatchNorm/dropout, but the user's module is theirs: we never leave a
    changed ``training`` flag behind.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _accepts_kwarg(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _check_target(path: Path, overwrite: bool) -> None:
    """Refuse before doing any work, so an existing file is never touched."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path} is a directory; give a file path ending in .onnx")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)  # a new directory overwrites nothing


def _publish(tmpdir: Path, path: Path, overwrite: bool) -> None:
    """Move the files from ``tmpdir`` next to ``path``.

    Side files (external data) go first and the ``.onnx`` last, so a reader never sees a model
    that points at weights that are not there yet.  Without ``overwrite`` each file is placed with
    ``os.link``, which fails instead of clobbering a file that appeared while we were exporting;
    with ``overwrite`` ``os.replace`` swaps it in atomically.
    """
    main = tmpdir / path.name
    files = [f for f in sorted(tmpdir.iterdir()) if f != main] + [main]
    if not overwrite:
        taken = [path.parent / f.name for f in files if (path.parent / f.name).exists()]
        if taken:
            raise OutputExistsError(f"{', '.join(map(str, taken))} appeared during export; nothing was written")
    for f in files:
        _place(f, path.parent / f.name, overwrite)


def _place(src: Path, dst: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)  # atomic create-if-absent
    except FileExistsError as exc:
        raise OutputExistsError(f"{dst} appeared during export; pass overwrite=True to replace it") from exc
    except OSError:  # no hard links on this filesystem: best effort
        if dst.exists():
            raise OutputExistsError(f"{dst} appeared during export; pass overwrite=True to replace it")
        os.replace(src, dst)


def _file_size(path: Path, tmp_files: Sequence[str]) -> int:
    return sum((path.parent / name).stat().st_size for name in tmp_files)


# --------------------------------------------------------------------------------------------
# Wrappers that make eager models exportable
# --------------------------------------------------------------------------------------------


class _FlatOutputs(nn.Module):
    """Positional tensors in, a flat tuple of tensors out.

    ONNX wants flat inputs/outputs with names; HF models take keyword arguments and return
    ``ModelOutput`` objects that may contain non-tensors (a cache).  The wrapper fixes the input
    order and drops everything that is not a tensor.
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str], extra_kwargs: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.extra_kwargs = dict(extra_kwargs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, args)), **self.extra_kwargs)
        return tuple(_tensor_leaves(out)[1])


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The list of transformer blocks of an HF decoder LM (``model.model.layers`` for Llama)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    for candidate in (base, getattr(model, "model", None), model):
        layers = getattr(candidate, "layers", None) if candidate is not None else None
        if isinstance(layers, nn.ModuleList):
            return layers
    raise FxpruneError(
        f"kv_cache=True needs an HF decoder LM with a `.layers` ModuleList; "
        f"could not find one on {type(model).__name__}"
    )


def _attention_of(layer: nn.Module) -> nn.Module | None:
    """The first submodule with separate k/v projections (``self_attn`` in Llama-likes)."""
    for mod in layer.modules():
        if isinstance(getattr(mod, "k_proj", None), nn.Linear) and isinstance(
            getattr(mod, "v_proj", None), nn.Linear
        ):
            return mod
    return None


def _config_head_dim(config: Any) -> int | None:
    if config is None:
        return None
    hd = getattr(config, "head_dim", None)
    if hd:
        return int(hd)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def kv_cache_layout(model: nn.Module) -> list[tuple[int, int, int]]:
    """Per layer ``(kv_heads, key_head_dim, value_head_dim)``.

    A pruned model can keep a different number of KV heads per layer, and the config records
    only one number.  The model itself is the truth: one tiny forward with the cache on gives
    every layer's key/value shapes, whatever its attention modules are called.  Models whose
    cache cannot be read that way fall back to the projections' ``out_features``.
    """
    probed = _probe_kv_layout(model)
    if probed is not None:
        return probed
    return _module_kv_layout(model)


def _probe_kv_layout(model: nn.Module) -> list[tuple[int, int, int]] | None:
    try:
        device = next(model.parameters()).device
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        with torch.no_grad(), _eval_mode(model):
            cache = model(input_ids=ids, use_cache=True).past_key_values
        layers = getattr(cache, "layers", None)
        if not layers:
            return None
        return [(int(l.keys.shape[1]), int(l.keys.shape[-1]), int(l.values.shape[-1])) for l in layers]
    except Exception:  # noqa: BLE001 - fall back to reading the modules
        return None


def _module_kv_layout(model: nn.Module) -> list[tuple[int, int, int]]:
    config = getattr(model, "config", None)
    cfg_hd = _config_head_dim(config)
    layout = []
    for i, layer in enumerate(_decoder_layers(model)):
        attn = _attention_of(layer)
        if attn is None:
            if config is None or cfg_hd is None:
                raise FxpruneError(f"layer {i}: no k_proj/v_proj and no config to read KV shapes from")
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            layout.append((int(kv), int(cfg_hd), int(cfg_hd)))
            continue
        head_dim = int(getattr(attn, "head_dim", None) or cfg_hd)
        k_out, v_out = attn.k_proj.out_features, attn.v_proj.out_features
        if k_out % head_dim:
            raise FxpruneError(
                f"layer {i}: k_proj.out_features={k_out} is not a multiple of head_dim={head_dim}"
            )
        kv = k_out // head_dim
        if kv == 0 or v_out % kv:
            raise FxpruneError(f"layer {i}: cannot split v_proj.out_features={v_out} into {kv} heads")
        layout.append((kv, head_dim, v_out // kv))
    return layout


class _KVDecoder(nn.Module):
    """Flat-tensor decoder step: ``(ids, mask, positions, *past) -> (logits, *present)``.

    It rebuilds a transformers ``DynamicCache`` from the flat past tensors (one ``update`` per
    layer, which is exactly what a layer's attention does at run time), runs the model and
    flattens the grown cache back out.  Because the cache is rebuilt from whatever shapes arrive,
    per-layer head counts need no special casing here.  Full-attention caches only: sliding-window
    or hybrid (linear-attention) layers would need their own cache layer types.
    """

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents: list[torch.Tensor] = []
        for layer in out.past_key_values.layers[: self.num_layers]:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def kv_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Optimum / onnxruntime-genai names for a KV-cache decoder with ``num_layers`` layers."""
    kv = [f"{{}}.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [n.format("past_key_values") for n in kv]
    outputs = ["logits"] + [n.format("present") for n in kv]
    return inputs, outputs


def _kv_example(
    ids: torch.Tensor, layout: Sequence[tuple[int, int, int]], past_len: int, dtype: torch.dtype,
    gen: torch.Generator, device: torch.device,
) -> list[torch.Tensor]:
    """Inputs for one decoder step: given ids, a past of ``past_len`` random states, ones mask."""
    b, s = ids.shape
    mask = torch.ones((b, past_len + s), dtype=torch.int64, device=device)
    pos = torch.arange(past_len, past_len + s, device=device).unsqueeze(0).expand(b, s).contiguous()
    past = []
    for kv, hk, hv in layout:
        past.append(torch.randn((b, kv, past_len, hk), generator=gen).to(device=device, dtype=dtype))
        past.append(torch.randn((b, kv, past_len, hv), generator=gen).to(device=device, dtype=dtype))
    return [ids.to(device), mask, pos, *past]


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """Everything needed to run torch.onnx.export and then check the result."""

    exportable: nn.Module | torch.export.ExportedProgram
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any
    reference: Any  # callable(list[tensor]) -> list[tensor], the eager ground truth
    check_inputs: list[torch.Tensor]
    notes: list[str]
    weights_bytes: int


def _validate_examples(example_inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise FxpruneError("example_inputs must be a non-empty dict of name -> tensor")
    bad = [k for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise FxpruneError(f"example_inputs values must be tensors; not tensors: {bad}")
    return dict(example_inputs)


def _check_sizes(batch: int, seq: int | None, check_batch: int | None, check_seq: int | None):
    cb = check_batch if check_batch is not None else batch + 1
    cs = check_seq if check_seq is not None else (seq + 3 if seq is not None else None)
    return cb, cs


def _plan_module(
    model: nn.Module, examples: dict[str, torch.Tensor], dynamic: bool,
    check_batch: int | None, check_seq: int | None, gen: torch.Generator,
) -> _Plan:
    """Plain export of an eager module with dynamic batch (and seq for id tensors)."""
    notes: list[str] = []
    names = list(examples)
    dims = {n: (_default_dynamic_dims(n, t) if dynamic else {}) for n, t in examples.items()}
    args = []
    for n in names:
        t = examples[n]
        big = _enlarge(t, list(dims[n]))
        if big.shape != t.shape:
            notes.append(
                f"example input {n!r} enlarged from {tuple(t.shape)} to {tuple(big.shape)}: "
                "torch.export specialises dynamic dims of size 1"
            )
        args.append(big)
    extra = {"use_cache": False} if _accepts_kwarg(model, "use_cache") else {}
    wrapper = _FlatOutputs(model, names, extra)
    with torch.no_grad():
        out_names, _ = _tensor_leaves(model(**dict(zip(names, args)), **extra))
    if not out_names:
        raise FxpruneError(f"{type(model).__name__} returned no tensors for the example inputs")

    dim_objs: dict[str, torch.export.Dim] = {}
    shapes = []
    for n in names:
        spec = {}
        for d, label in dims[n].items():
            dim_objs.setdefault(label, torch.export.Dim(label))
            spec[d] = dim_objs[label]
        shapes.append(spec or None)

    batch = int(args[0].shape[0]) if args[0].dim() else 1
    seqs = [int(a.shape[1]) for n, a in zip(names, args) if 1 in dims[n]]
    cb, cs = _check_sizes(batch, seqs[0] if seqs else None, check_batch, check_seq)
    check = []
    for n, a in zip(names, args):
        shape = list(a.shape)
        if 0 in dims[n]:
            shape[0] = cb
        if 1 in dims[n] and cs is not None:
            shape[1] = cs
        check.append(_fresh_like(n, a, shape, gen).to(a.device))
    if not dynamic:
        check = [a.clone() for a in args]
        notes.append("dynamic=False: checked at the export shapes")

    def reference(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(wrapper(*inputs))

    return _Plan(
        exportable=wrapper, args=tuple(args), input_names=names, output_names=out_names,
        dynamic_shapes=(tuple(shapes),), reference=reference, check_inputs=check, notes=notes,
        weights_bytes=_weights_bytes(iter(list(model.parameters()) + list(model.buffers()))),
    )


def _ep_dynamic_dims(ep: torch.export.ExportedProgram) -> dict[str, dict[int, bool]]:
    """Which dims of each user input of an ExportedProgram are symbolic."""
    user_inputs = set(ep.graph_signature.user_inputs)
    result = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                result[node.name] = {
                    d: True for d, s in enumerate(val.shape) if not isinstance(s, int)
                }
    return result


def _bind_program_inputs(
    ep: torch.export.ExportedProgram, examples: dict[str, torch.Tensor]
) -> tuple[int, list[str]]:
    """How the program was called: number of positional args and the kwarg names.

    A program traced as ``f(x)`` must be called positionally and one traced as
    ``f(input_ids=...)`` by keyword; the example dict is matched to that, in its own order.
    """
    in_spec = ep.call_spec.in_spec
    n_args = in_spec.child(0).num_children if in_spec is not None else len(examples)
    kw_names = list(in_spec.child(1).context) if in_spec is not None else []
    names = list(examples)
    if n_args + len(kw_names) != len(names) or not set(kw_names) <= set(names):
        raise FxpruneError(
            f"example_inputs {names} do not match the ExportedProgram's inputs "
            f"({n_args} positional, keywords {kw_names})"
        )
    positional = [n for n in names if n not in kw_names]
    return n_args, positional + kw_names


def _plan_program(
    ep: torch.export.ExportedProgram, examples: dict[str, torch.Tensor],
    check_batch: int | None, check_seq: int | None, gen: torch.Generator,
) -> _Plan:
    """Export of a user's ExportedProgram: its dynamic dims are whatever it was traced with."""
    notes: list[str] = []
    module = ep.module()
    n_args, order = _bind_program_inputs(ep, examples)
    graph_names = list(ep.graph_signature.user_inputs)  # ONNX input names, same flat order
    dyn = _ep_dynamic_dims(ep)

    def call(inputs: Sequence[torch.Tensor]) -> Any:
        return module(*inputs[:n_args], **dict(zip(order[n_args:], inputs[n_args:])))

    ordered = [examples[n] for n in order]
    with torch.no_grad():
        out_names, _ = _tensor_leaves(call(ordered))
    first = ordered[0]
    batch = int(first.shape[0]) if first.dim() else 1
    seq = int(first.shape[1]) if first.dim() > 1 and _is_int(first) else None
    cb, cs = _check_sizes(batch, seq, check_batch, check_seq)
    check = []
    any_dynamic = False
    for name, gname, t in zip(order, graph_names, ordered):
        shape = list(t.shape)
        for d in dyn.get(gname, {}):
            any_dynamic = True
            shape[d] = cb if d == 0 else (cs if cs is not None else shape[d] + 3)
        check.append(_fresh_like(name, t, shape, gen).to(t.device))
    if not any_dynamic:
        notes.append("the ExportedProgram has no dynamic dims: checked at the export shapes")

    def reference(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensor_leaves(call(inputs))[1]

    tensors = list(ep.state_dict.values()) + [
        v for v in ep.constants.values() if isinstance(v, torch.Tensor)
    ]
    return _Plan(
        exportable=ep, args=tuple(ordered), input_names=graph_names,
        output_names=out_names, dynamic_shapes=None, reference=reference, check_inputs=check,
        notes=notes, weights_bytes=_weights_bytes(iter(tensors)),
    )


def _plan_kv(
    model: nn.Module, examples: dict[str, torch.Tensor],
    check_batch: int | None, check_seq: int | None, gen: torch.Generator,
) -> _Plan:
    """KV-cache decoder export; see :class:`_KVDecoder`."""
    if "input_ids" not in examples:
        raise FxpruneError("kv_cache=True needs example_inputs['input_ids'] of shape [batch, seq]")
    ids = examples["input_ids"]
    if ids.dim() != 2 or not _is_int(ids):
        raise FxpruneError(f"input_ids must be a 2-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    notes: list[str] = []
    big = _enlarge(ids, [0, 1])
    if big.shape != ids.shape:
        notes.append(
            f"example input_ids enlarged from {tuple(ids.shape)} to {tuple(big.shape)}: "
            "torch.export specialises dynamic dims of size 1"
        )
    layout = kv_cache_layout(model)
    n_layers = len(layout)
    wrapper = _KVDecoder(model, n_layers)
    dtype, device = _model_dtype(model), _model_device(model)
    b, s = big.shape
    past_len = s + 1  # distinct from seq so the tracer cannot unify the two symbols
    args = _kv_example(big, layout, past_len, dtype, gen, device)
    in_names, out_names = kv_io_names(n_layers)

    B, S = torch.export.Dim("batch"), torch.export.Dim("seq")
    P, T = torch.export.Dim("past_seq"), torch.export.Dim("total_seq")
    shapes = ({0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}, tuple({0: B, 2: P} for _ in range(2 * n_layers)))

    cb, cs = _check_sizes(b, s, check_batch, check_seq)
    check_ids = _fresh_like("input_ids", big, (cb, cs), gen).to(device)
    check = _kv_example(check_ids, layout, past_len + 2, dtype, gen, device)

    def reference(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(wrapper(*inputs))

    return _Plan(
        exportable=wrapper, args=tuple(args), input_names=in_names, output_names=out_names,
        dynamic_shapes=shapes, reference=reference, check_inputs=check, notes=notes,
        weights_bytes=_weights_bytes(iter(list(model.parameters()) + list(model.buffers()))),
    )


def _run_torch_onnx(plan: _Plan, dynamic: bool, optimize: bool):
    """Call the dynamo exporter quietly; wrap its failures in an fxprune error with the cause."""
    kwargs: dict[str, Any] = dict(
        dynamo=True, verbose=False, optimize=optimize,
        input_names=plan.input_names, output_names=plan.output_names,
    )
    if plan.dynamic_shapes is not None and dynamic:
        kwargs["dynamic_shapes"] = plan.dynamic_shapes
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_Devnull()):
            warnings.simplefilter("ignore")
            return torch.onnx.export(plan.exportable, plan.args, **kwargs)
    except Exception as exc:
        raise FxpruneError(f"torch.onnx.export (dynamo) failed: {type(exc).__name__}: {exc}") from exc


class _Devnull:
    """stdout sink for the exporter's progress lines."""

    def write(self, _s: str) -> int:
        return len(_s)

    def flush(self) -> None:
        pass


def _verify(
    onnx_path: Path, plan: _Plan, providers: list[str], rtol: float, atol: float
) -> tuple[float, dict[str, tuple[int, ...]]]:
    """Run ORT and eager PyTorch on the check inputs; raise VerificationError past tolerance."""
    try:
        sess = _session(onnx_path, providers)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot load the exported model: {exc}") from exc
    onnx_inputs = [i.name for i in sess.get_inputs()]
    names = plan.input_names
    if not set(names) & set(onnx_inputs) and len(names) == len(onnx_inputs):
        names = onnx_inputs  # the exporter renamed the inputs; the order is the same
    # inputs the graph ignores (e.g. an unused mask) may have been dropped from the ONNX graph
    feed = {n: _to_numpy(t) for n, t in zip(names, plan.check_inputs) if n in onnx_inputs}
    shapes = {n: tuple(t.shape) for n, t in zip(plan.input_names, plan.check_inputs)}
    try:
        got = sess.run(None, feed)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime failed at input shapes {shapes}: {exc}") from exc
    want = [_to_numpy(t) for t in plan.reference(plan.check_inputs)]
    if len(got) != len(want):
        raise VerificationError(
            f"ONNX model returned {len(got)} outputs, PyTorch {len(want)} at shapes {shapes}"
        )
    worst, worst_name = 0.0, None
    for name, g, w in zip(plan.output_names, got, want):
        if g.shape != w.shape:
            raise VerificationError(
                f"output {name!r}: ONNX shape {g.shape} != PyTorch shape {w.shape} at input shapes {shapes}"
            )
        if g.size == 0:
            continue
        diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
        if not np.isfinite(diff):
            raise VerificationError(f"output {name!r}: non-finite difference at input shapes {shapes}")
        if diff > worst:
            worst, worst_name = diff, name
        if not np.allclose(g, w, rtol=rtol, atol=atol):
            raise VerificationError(
                f"ONNX output {name!r} differs from PyTorch: max |diff| = {diff:.3e} "
                f"(rtol={rtol}, atol={atol}) at input shapes {shapes}"
            )
    return worst, shapes


def export_onnx(
    model_or_ep: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike,
    *,
    example_inputs: Mapping[str, torch.Tensor],
    dynamic: bool = True,
    kv_cache: bool = False,
    external_data: bool | None = None,
    overwrite: bool = False,
    check: bool = True,
    check_batch: int | None = None,
    check_seq: int | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    providers: Sequence[str] | None = None,
    optimize: bool = True,
) -> ExportResult:
    """Export to ONNX with the dynamo exporter, atomically, and verify in ONNX Runtime.

    Dynamic axes: dim 0 of every input is ``batch``; dim 1 of 2-D integer inputs is ``seq``.
    Size-1 dynamic dims in ``example_inputs`` are enlarged to 2 (torch.export would specialise
    them) and a note says so.  An ``ExportedProgram`` keeps the dynamic dims it was traced with.

    ``kv_cache=True`` (HF decoder LMs) exports one decoder step with explicit past/present
    tensors named like Optimum; per-layer KV shapes come from the modules.

    ``external_data=None`` stores weights in a side file when they exceed 1.5 GB.
    ``optimize`` runs the exporter's ONNX graph optimizer (constant folding, dead code); turning
    it off only makes the export faster (tests, debugging), ORT optimizes again at load time.

    The file is written into a temporary directory next to ``path`` and moved into place only
    after the check passed; an existing ``path`` raises :class:`OutputExistsError` before any work
    unless ``overwrite=True``.  ``check=True`` compares ORT and PyTorch at ``check_batch`` x
    ``check_seq`` (default: batch+1, seq+3, i.e. shapes the export never saw) and raises
    :class:`VerificationError` with the max difference when ``allclose(rtol, atol)`` fails.
    """
    path = Path(path)
    _check_target(path, overwrite)
    examples = _validate_examples(example_inputs)
    providers = list(providers) if providers else ort_providers()
    gen = torch.Generator().manual_seed(0)

    if isinstance(model_or_ep, torch.export.ExportedProgram):
        if kv_cache:
            raise FxpruneError("kv_cache=True needs the eager nn.Module, not an ExportedProgram")
        plan = _plan_program(model_or_ep, examples, check_batch, check_seq, gen)
        ctx = contextlib.nullcontext()
    elif isinstance(model_or_ep, nn.Module):
        ctx = _eval_mode(model_or_ep)
    else:
        raise FxpruneError(
            f"expected an nn.Module or torch.export.ExportedProgram, got {type(model_or_ep).__name__}"
        )

    with ctx:
        if isinstance(model_or_ep, nn.Module):
            if kv_cache:
                plan = _plan_kv(model_or_ep, examples, check_batch, check_seq, gen)
            else:
                plan = _plan_module(model_or_ep, examples, dynamic, check_batch, check_seq, gen)
        for note in plan.notes:
            warnings.warn(note, stacklevel=2)
        program = _run_torch_onnx(plan, dynamic, optimize)
        use_external = (
            bool(external_data) if external_data is not None else plan.weights_bytes > EXTERNAL_DATA_THRESHOLD
        )
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            tmp_model = tmpdir / path.name
            program.save(str(tmp_model), external_data=use_external)
            tmp_files = sorted(f.name for f in tmpdir.iterdir())
            max_diff, shapes = (None, {})
            if check:
                max_diff, shapes = _verify(tmp_model, plan, providers, rtol, atol)
            input_names, output_names = _onnx_io_names(tmp_model)
            _publish(tmpdir, path, overwrite)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    return ExportResult(
        path=path, input_names=input_names, output_names=output_names, max_abs_diff=max_diff,
        providers=providers, file_size=_file_size(path, tmp_files),
        external_data=use_external or len(tmp_files) > 1, check_shapes=shapes, notes=plan.notes,
    )


def _onnx_io_names(path: Path) -> tuple[list[str], list[str]]:
    """Graph input/output names as written (without loading external weights)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]


# --------------------------------------------------------------------------------------------
# Generation and latency in ONNX Runtime
# --------------------------------------------------------------------------------------------

_ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclasses.dataclass
class _KVSpec:
    """Shapes the KV decoder's inputs declare, read from the session (per layer)."""

    past_names: list[str]
    present_names: list[str]
    past_shapes: list[tuple[int, int]]  # (heads, head_dim) per past input
    past_dtype: Any
    vocab: int | None


def _kv_spec(sess) -> _KVSpec:
    inputs = {i.name: i for i in sess.get_inputs()}
    missing = [n for n in ("input_ids", "position_ids") if n not in inputs]
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    if missing or not past_names:
        raise FxpruneError(
            "this ONNX model is not a KV-cache decoder (export it with kv_cache=True); "
            f"its inputs are {list(inputs)}"
        )
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    shapes = []
    for n in past_names:
        shp = inputs[n].shape
        if not (isinstance(shp[1], int) and isinstance(shp[3], int)):
            raise FxpruneError(f"{n}: heads/head_dim must be static in the ONNX graph, got {shp}")
        shapes.append((shp[1], shp[3]))
    logits = [o for o in sess.get_outputs() if o.name == "logits"]
    vocab = logits[0].shape[-1] if logits and isinstance(logits[0].shape[-1], int) else None
    dtype = _ORT_TO_NP.get(inputs[past_names[0]].type, np.float32)
    return _KVSpec(past_names, present_names, shapes, dtype, vocab)


def _empty_past(spec: _KVSpec, batch: int) -> dict[str, np.ndarray]:
    return {n: np.zeros((batch, h, 0, d), dtype=spec.past_dtype) for n, (h, d) in zip(spec.past_names, spec.past_shapes)}


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    """HF-style position ids: count of real tokens so far, left padding gets position 0."""
    pos = np.cumsum(mask, axis=1) - 1
    pos = np.where(mask == 0, 0, pos)
    return pos[:, -new:].astype(np.int64)


def onnx_generate(
    session_or_path: Any,
    input_ids: torch.Tensor | np.ndarray,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | np.ndarray | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    providers: Sequence[str] | None = None,
) -> np.ndarray:
    """Greedy decoding with the KV cache, entirely in ONNX Runtime.

    Mirrors ``model.generate(do_sample=False)``: one prefill step over the prompt, then one token
    per step with the presents fed back as pasts.  Returns ``[batch, prompt + generated]`` ids;
    sequences that hit ``eos_token_id`` are padded with ``pad_token_id`` and decoding stops when
    all have finished (as HF does).  Left-padded batches work through ``attention_mask``.
    """
    sess = _session(session_or_path, providers)
    spec = _kv_spec(sess)
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise FxpruneError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = (
        np.ones_like(ids)
        if attention_mask is None
        else np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask, dtype=np.int64)
    )
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)

    batch = ids.shape[0]
    tokens = ids
    past = _empty_past(spec, batch)
    step_ids = ids
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        feed = {"input_ids": step_ids, "attention_mask": mask, "position_ids": _positions(mask, step_ids.shape[1]), **past}
        outs = sess.run(None, feed)
        named = dict(zip([o.name for o in sess.get_outputs()], outs))
        nxt = named["logits"][:, -1, :].argmax(-1).astype(np.int64)
        nxt = np.where(done, pad, nxt)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        if eos:
            done |= np.isin(nxt, list(eos))
            if done.all():
                break
        past = {p: named[q] for p, q in zip(spec.past_names, spec.present_names)}
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        step_ids = nxt[:, None]
    return tokens


class _Runner:
    """One decoder step, either plain ``run`` or IOBinding.

    With IOBinding (used on CUDA) the presents stay on the device as OrtValues and are bound
    straight back as the next step's pasts, so the KV cache never crosses PCIe; only the logits
    of the last position are read back.
    """

    def __init__(self, sess, spec: _KVSpec, io_binding: bool):
        self.sess, self.spec, self.io_binding = sess, spec, io_binding
        provider = sess.get_providers()[0]
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self.output_names = [o.name for o in sess.get_outputs()]

    def _ortvalue(self, arr: np.ndarray):
        ort = _import_ort()
        return ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0)

    def start(self, batch: int) -> dict[str, Any]:
        past = _empty_past(self.spec, batch)
        if self.io_binding:
            return {k: self._ortvalue(v) for k, v in past.items()}
        return past

    def step(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Run one step; returns (argmax next token per row, new past)."""
        pos = _positions(mask, ids.shape[1])
        if not self.io_binding:
            outs = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
            named = dict(zip(self.output_names, outs))
            new_past = {p: named[q] for p, q in zip(self.spec.past_names, self.spec.present_names)}
            return named["logits"][:, -1, :].argmax(-1).astype(np.int64), new_past
        binding = self.sess.io_binding()
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            binding.bind_ortvalue_input(name, self._ortvalue(np.ascontiguousarray(arr)))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.sess.run_with_iobinding(binding)
        values = dict(zip(self.output_names, binding.get_outputs()))
        logits = values["logits"].numpy()
        new_past = {p: values[q] for p, q in zip(self.spec.past_names, self.spec.present_names)}
        return logits[:, -1, :].argmax(-1).astype(np.int64), new_past


def _median_ms(samples: Sequence[float]) -> float:
    return float(statistics.median(samples)) * 1e3


def benchmark_latency(
    session_or_path: Any,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    warmup: int = 3,
    repeats: int = 10,
    vocab_size: int | None = None,
    providers: Sequence[str] | None = None,
    io_binding: bool | str = "auto",
    seed: int = 0,
) -> LatencyResult:
    """Prefill latency and per-token decode latency of a KV-cache decoder in ORT.

    Prefill: one step over ``batch_size x prompt_len`` random tokens from an empty cache.
    Decode: ``decode_tokens`` greedy steps after that prefill; per-token latency is the loop time
    divided by ``decode_tokens``.  ``warmup`` untimed runs of each come first (allocator and
    kernel selection), then the median of ``repeats`` timed runs is reported.  ``io_binding``
    ``"auto"`` uses IOBinding on CUDA only, where it keeps the cache on the GPU.
    """
    sess = _session(session_or_path, providers)
    spec = _kv_spec(sess)
    vocab = vocab_size or spec.vocab
    if vocab is None:
        raise FxpruneError("vocab size unknown (dynamic logits dim): pass vocab_size=")
    use_binding = (sess.get_providers()[0] == "CUDAExecutionProvider") if io_binding == "auto" else bool(io_binding)
    runner = _Runner(sess, spec, use_binding)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch_size, prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)

    def prefill() -> tuple[np.ndarray, dict[str, Any], float]:
        t0 = time.perf_counter()
        nxt, past = runner.step(ids, mask, runner.start(batch_size))
        return nxt, past, time.perf_counter() - t0

    def decode(nxt: np.ndarray, past: dict[str, Any]) -> float:
        m = mask
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            m = np.concatenate([m, np.ones((batch_size, 1), dtype=np.int64)], axis=1)
            nxt, past = runner.step(nxt[:, None], m, past)
        return (time.perf_counter() - t0) / max(decode_tokens, 1)

    for _ in range(warmup):
        nxt, past, _t = prefill()
        decode(nxt, past)
    pre, dec = [], []
    for _ in range(repeats):
        nxt, past, t = prefill()
        pre.append(t)
        dec.append(decode(nxt, past))
    return LatencyResult(
        prefill_ms=_median_ms(pre), decode_ms_per_token=_median_ms(dec),
        provider=sess.get_providers()[0], batch_size=batch_size, prompt_len=prompt_len,
        decode_tokens=decode_tokens, io_binding=use_binding,
        prefill_samples_ms=[x * 1e3 for x in pre], decode_samples_ms=[x * 1e3 for x in dec],
    )
