"""Export a (pruned) model to a deployment target and prove it computes what PyTorch computes.

Why this pass exists: a structurally pruned model is only worth something if the smaller shapes
reach the runtime that serves it.  This module is the target-neutral harness of that step; the
targets themselves are :mod:`fxprune.backends` (ONNX / ONNX Runtime today) and running the results
(decoding, latency) is :mod:`fxprune.runtime`.

How it is built: the user's eager module, ``torch.export.ExportedProgram`` or HF decoder LM is
parsed once, by a *planner*, into an immutable :class:`ExportRecipe` -- what to trace, with which
example args, names and dynamic dims, the eager reference to compare with, and inputs at shapes
the export never saw (a specialised shape is the classic silent export bug).  :func:`export` then
hands the recipe to a backend inside a :class:`~fxprune.util.publish.Publication`: the backend
writes into a private temporary directory, the harness runs the written model at the check
shapes and compares it with PyTorch (:class:`VerificationError` with the max difference and the
shapes), and only then are the files published atomically next to the destination.  Every
backend gets these guarantees without writing them again.

Planners (a registry, :data:`PLANNERS`): ``module`` (plain ``nn.Module``: dynamic batch, and
sequence for 2-D integer inputs), ``program`` (an ``ExportedProgram`` keeps its own dynamic dims)
and ``kv`` (an HF decoder LM as one decoder step with an explicit KV cache).

KV-cache I/O names follow Optimum / onnxruntime-genai: inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key`` / ``.value``; outputs ``logits``,
``present.{i}.key`` / ``.value``.  Cache tensors are ``[batch, kv_heads_i, seq, head_dim_i]``;
``kv_heads_i`` and ``head_dim_i`` are read per layer from the modules, because a pruned model may
keep a different number of KV heads in every layer.

Public entry points: :func:`export`, :func:`export_onnx`, :func:`build_recipe`,
:func:`kv_cache_layout`; :func:`onnx_generate`, :func:`benchmark_latency` and
:func:`ort_providers` are re-exported from their homes for existing callers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fxprune.backends import ExportBackend, get_backend, to_numpy
from fxprune.backends.onnx import ort_providers
from fxprune.errors import ExportError, VerificationError
from fxprune.runtime import LatencyResult, benchmark_latency, onnx_generate
from fxprune.util.hf import attention_of, cache_off, config_head_dim, decoder_layers
from fxprune.util.modules import eval_mode, first_device, model_dtype
from fxprune.util.outputs import named_tensor_leaves, tensor_leaves
from fxprune.util.publish import Publication

__all__ = [
    "ExportRecipe",
    "ExportResult",
    "LatencyResult",
    "PLANNERS",
    "build_recipe",
    "export",
    "export_onnx",
    "onnx_generate",
    "benchmark_latency",
    "ort_providers",
    "kv_cache_layout",
    "kv_io_names",
]


# --------------------------------------------------------------------------------------------
# Recipe and result
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportRecipe:
    """Everything a backend needs to export, and the harness needs to check the result.

    ``exportable`` is traced with ``args`` (positional, in ``input_names`` order) and
    ``dynamic_shapes`` (``torch.export`` form, None for static or an ExportedProgram's own);
    ``reference`` maps a list of input tensors to the eager outputs (``output_names`` order);
    ``check_inputs`` are inputs at shapes the export never saw.  ``weights_bytes`` counts
    distinct storages (tied weights once), for backends that split large weights off.
    """

    exportable: nn.Module | torch.export.ExportedProgram
    args: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_shapes: Any
    reference: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    check_inputs: tuple[torch.Tensor, ...]
    notes: tuple[str, ...]
    weights_bytes: int

    @property
    def check_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in zip(self.input_names, self.check_inputs)}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how well it matched PyTorch.

    ``max_abs_diff`` is measured at ``check_shapes`` (deliberately not the export shapes) and is
    ``None`` when ``check=False``.  ``file_size`` counts the main file plus any side files
    (``files``, e.g. ONNX external data); ``providers`` is what the check ran on.
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
    backend: str = "onnx"
    files: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Input synthesis
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


def _enlarged(name: str, t: torch.Tensor, dims: Sequence[int], notes: list[str]) -> torch.Tensor:
    """:func:`_enlarge`, with a note for the user when it changed the shape."""
    big = _enlarge(t, dims)
    if big.shape != t.shape:
        notes.append(
            f"example input {name!r} enlarged from {tuple(t.shape)} to {tuple(big.shape)}: "
            "torch.export specialises dynamic dims of size 1"
        )
    return big


def _fresh_like(name: str, t: torch.Tensor, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """A new tensor of ``shape`` with values of the same kind as ``t`` (on ``t``'s device).

    Integer inputs draw from the example's own value range (so ids stay < vocab and an all-ones
    mask stays all ones); masks are all ones to avoid fully masked rows, whose NaNs would make the
    comparison meaningless.
    """
    shape = tuple(int(s) for s in shape)
    if t.dtype == torch.bool:
        out = torch.ones(shape, dtype=torch.bool)
    elif _is_int(t):
        if "mask" in name and t.numel() and int(t.min()) >= 0 and int(t.max()) <= 1:
            out = torch.ones(shape, dtype=t.dtype)
        else:
            lo = int(t.min()) if t.numel() else 0
            hi = int(t.max()) if t.numel() else 1
            out = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(t.dtype)
    else:
        out = torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype)
    return out.to(t.device)


def _check_sizes(batch: int, seq: int | None, check_batch: int | None, check_seq: int | None):
    """Check batch/seq: the user's, else one more batch row and three more positions."""
    cb = check_batch if check_batch is not None else batch + 1
    cs = check_seq if check_seq is not None else (seq + 3 if seq is not None else None)
    return cb, cs


def _weights_bytes(tensors: Iterable[torch.Tensor]) -> int:
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


def _module_weights_bytes(model: nn.Module) -> int:
    return _weights_bytes(list(model.parameters()) + list(model.buffers()))


def example_dict(model_or_ep: Any, example_inputs: Any) -> dict[str, Any]:
    """Example inputs by name, from torch.export's conventions (or the HF defaults when None).

    A tuple of positional args is bound to the forward's parameter names (to the program's input
    names for an ExportedProgram); ``(args, kwargs)`` merges both; None builds token ids / pixel
    values from an HF model's config, as ``prune`` does.
    """
    from fxprune.passes.capture import as_keyword_inputs, split_example_inputs
    from fxprune.util.hf import default_example_inputs

    if example_inputs is None:
        module = model_or_ep if isinstance(model_or_ep, nn.Module) else None
        if module is None or getattr(module, "config", None) is None:
            raise ExportError("pass example_inputs=... (only Hugging Face models get default inputs from their config)")
        return default_example_inputs(module)
    args, kwargs = split_example_inputs(example_inputs)
    if not args:
        return kwargs
    if isinstance(model_or_ep, torch.export.ExportedProgram):
        names = [n for n in model_or_ep.graph_signature.user_inputs if n not in kwargs]
        return {**dict(zip(names, args, strict=False)), **kwargs}
    bound = as_keyword_inputs(model_or_ep, args, kwargs)
    if bound is None:
        raise ExportError(f"{type(model_or_ep).__name__}.forward takes *args: pass example_inputs as a dict")
    return bound


def _validate_examples(example_inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise ExportError("example_inputs must be a non-empty dict of name -> tensor")
    bad = [k for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(f"example_inputs values must be tensors; not tensors: {bad}")
    return dict(example_inputs)


# --------------------------------------------------------------------------------------------
# HF KV-cache adapter
# --------------------------------------------------------------------------------------------


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
        ids = torch.zeros(1, 2, dtype=torch.long, device=first_device(model))
        with torch.no_grad(), eval_mode(model):
            cache = model(input_ids=ids, use_cache=True).past_key_values
        layers = getattr(cache, "layers", None)
        # slots no attention wrote are not cache layers (a depth-pruned model whose attentions
        # were removed keeps its remaining ones in the first slots)
        layers = [l for l in layers or () if getattr(l, "keys", None) is not None and l.keys.numel()]
        if not layers:
            return None
        return [(int(l.keys.shape[1]), int(l.keys.shape[-1]), int(l.values.shape[-1])) for l in layers]
    except Exception:  # noqa: BLE001 - fall back to reading the modules
        return None


def _module_kv_layout(model: nn.Module) -> list[tuple[int, int, int]]:
    config = getattr(model, "config", None)
    cfg_hd = config_head_dim(config)
    layers = decoder_layers(model)
    if layers is None:
        raise ExportError(
            f"kv_cache=True needs an HF decoder LM with a `.layers` ModuleList; "
            f"could not find one on {type(model).__name__}"
        )
    layout = []
    for i, layer in enumerate(layers):
        attn = attention_of(layer)
        if attn is None:
            if config is None or cfg_hd is None:
                raise ExportError(f"layer {i}: no k_proj/v_proj and no config to read KV shapes from")
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            layout.append((int(kv), int(cfg_hd), int(cfg_hd)))
            continue
        head_dim = int(getattr(attn, "head_dim", None) or cfg_hd)
        k_out, v_out = attn.k_proj.out_features, attn.v_proj.out_features
        if k_out % head_dim:
            raise ExportError(f"layer {i}: k_proj.out_features={k_out} is not a multiple of head_dim={head_dim}")
        kv = k_out // head_dim
        if kv == 0 or v_out % kv:
            raise ExportError(f"layer {i}: cannot split v_proj.out_features={v_out} into {kv} heads")
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

    def __init__(self, model: nn.Module, num_layers: int) -> None:
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
# Planners: model + examples -> ExportRecipe
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PlanOptions:
    dynamic: bool
    check_batch: int | None
    check_seq: int | None


class _FlatOutputs(nn.Module):
    """Positional tensors in, a flat tuple of tensors out.

    Export targets want flat inputs/outputs with names; HF models take keyword arguments and
    return ``ModelOutput`` objects that may contain non-tensors (a cache).  The wrapper fixes the
    input order and drops everything that is not a tensor.
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str], extra_kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.extra_kwargs = dict(extra_kwargs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor_leaves(self.model(**dict(zip(self.input_names, args)), **self.extra_kwargs)))


def _no_grad_reference(fn: Callable[..., Any]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The eager ground truth as ``inputs -> list of output tensors``, without autograd."""

    def reference(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return tensor_leaves(fn(inputs))

    return reference


def _plan_module(model: nn.Module, examples: dict[str, torch.Tensor], opts: _PlanOptions,
                 gen: torch.Generator) -> ExportRecipe:
    """Plain export of an eager module with dynamic batch (and seq for id tensors)."""
    notes: list[str] = []
    names = list(examples)
    dims = {n: (_default_dynamic_dims(n, t) if opts.dynamic else {}) for n, t in examples.items()}
    args = [_enlarged(n, examples[n], list(dims[n]), notes) for n in names]
    extra = cache_off(model)
    wrapper = _FlatOutputs(model, names, extra)
    with torch.no_grad():
        out_names, _ = named_tensor_leaves(model(**dict(zip(names, args)), **extra))
    if not out_names:
        raise ExportError(f"{type(model).__name__} returned no tensors for the example inputs")

    dim_objs: dict[str, torch.export.Dim] = {}
    shapes = []
    for n in names:
        spec = {d: dim_objs.setdefault(label, torch.export.Dim(label)) for d, label in dims[n].items()}
        shapes.append(spec or None)

    batch = int(args[0].shape[0]) if args[0].dim() else 1
    seqs = [int(a.shape[1]) for n, a in zip(names, args) if 1 in dims[n]]
    cb, cs = _check_sizes(batch, seqs[0] if seqs else None, opts.check_batch, opts.check_seq)
    check = []
    for n, a in zip(names, args):
        shape = list(a.shape)
        if 0 in dims[n]:
            shape[0] = cb
        if 1 in dims[n] and cs is not None:
            shape[1] = cs
        check.append(_fresh_like(n, a, shape, gen))
    if not opts.dynamic:
        check = [a.clone() for a in args]
        notes.append("dynamic=False: checked at the export shapes")

    return ExportRecipe(
        exportable=wrapper, args=tuple(args), input_names=tuple(names), output_names=tuple(out_names),
        dynamic_shapes=(tuple(shapes),) if opts.dynamic else None,
        reference=_no_grad_reference(lambda inputs: wrapper(*inputs)), check_inputs=tuple(check),
        notes=tuple(notes), weights_bytes=_module_weights_bytes(model),
    )


def _ep_dynamic_dims(ep: torch.export.ExportedProgram) -> dict[str, dict[int, bool]]:
    """Which dims of each user input of an ExportedProgram are symbolic."""
    user_inputs = set(ep.graph_signature.user_inputs)
    result = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                result[node.name] = {d: True for d, s in enumerate(val.shape) if not isinstance(s, int)}
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
        raise ExportError(
            f"example_inputs {names} do not match the ExportedProgram's inputs "
            f"({n_args} positional, keywords {kw_names})"
        )
    positional = [n for n in names if n not in kw_names]
    return n_args, positional + kw_names


def _plan_program(ep: torch.export.ExportedProgram, examples: dict[str, torch.Tensor], opts: _PlanOptions,
                  gen: torch.Generator) -> ExportRecipe:
    """Export of a user's ExportedProgram: its dynamic dims are whatever it was traced with."""
    notes: list[str] = []
    module = ep.module()
    n_args, order = _bind_program_inputs(ep, examples)
    graph_names = list(ep.graph_signature.user_inputs)  # the exported input names, same flat order
    dyn = _ep_dynamic_dims(ep)

    def call(inputs: Sequence[torch.Tensor]) -> Any:
        return module(*inputs[:n_args], **dict(zip(order[n_args:], inputs[n_args:])))

    ordered = [examples[n] for n in order]
    with torch.no_grad():
        out_names, _ = named_tensor_leaves(call(ordered))
    first = ordered[0]
    batch = int(first.shape[0]) if first.dim() else 1
    seq = int(first.shape[1]) if first.dim() > 1 and _is_int(first) else None
    cb, cs = _check_sizes(batch, seq, opts.check_batch, opts.check_seq)
    check = []
    any_dynamic = False
    for name, gname, t in zip(order, graph_names, ordered):
        shape = list(t.shape)
        for d in dyn.get(gname, {}):
            any_dynamic = True
            shape[d] = cb if d == 0 else (cs if cs is not None else shape[d] + 3)
        check.append(_fresh_like(name, t, shape, gen))
    if not any_dynamic:
        notes.append("the ExportedProgram has no dynamic dims: checked at the export shapes")

    tensors = list(ep.state_dict.values()) + [v for v in ep.constants.values() if isinstance(v, torch.Tensor)]
    return ExportRecipe(
        exportable=ep, args=tuple(ordered), input_names=tuple(graph_names), output_names=tuple(out_names),
        dynamic_shapes=None, reference=_no_grad_reference(call), check_inputs=tuple(check),
        notes=tuple(notes), weights_bytes=_weights_bytes(tensors),
    )


def _plan_kv(model: nn.Module, examples: dict[str, torch.Tensor], opts: _PlanOptions,
             gen: torch.Generator) -> ExportRecipe:
    """KV-cache decoder export; see :class:`_KVDecoder`."""
    if "input_ids" not in examples:
        raise ExportError("kv_cache=True needs example_inputs['input_ids'] of shape [batch, seq]")
    ids = examples["input_ids"]
    if ids.dim() != 2 or not _is_int(ids):
        raise ExportError(f"input_ids must be a 2-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    notes: list[str] = []
    big = _enlarged("input_ids", ids, [0, 1], notes)
    layout = kv_cache_layout(model)
    n_layers = len(layout)
    wrapper = _KVDecoder(model, n_layers)
    dtype, device = model_dtype(model), first_device(model)
    b, s = big.shape
    past_len = s + 1  # distinct from seq so the tracer cannot unify the two symbols
    args = _kv_example(big, layout, past_len, dtype, gen, device)
    in_names, out_names = kv_io_names(n_layers)

    B, S = torch.export.Dim("batch"), torch.export.Dim("seq")
    P, T = torch.export.Dim("past_seq"), torch.export.Dim("total_seq")
    shapes = ({0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}, tuple({0: B, 2: P} for _ in range(2 * n_layers)))

    cb, cs = _check_sizes(b, s, opts.check_batch, opts.check_seq)
    check_ids = _fresh_like("input_ids", big, (cb, cs), gen).to(device)
    check = _kv_example(check_ids, layout, past_len + 2, dtype, gen, device)

    return ExportRecipe(
        exportable=wrapper, args=tuple(args), input_names=tuple(in_names), output_names=tuple(out_names),
        dynamic_shapes=shapes if opts.dynamic else None,
        reference=_no_grad_reference(lambda inputs: wrapper(*inputs)), check_inputs=tuple(check),
        notes=tuple(notes), weights_bytes=_module_weights_bytes(model),
    )


#: Planner name -> ``(model, examples, options, generator) -> ExportRecipe``.
PLANNERS: dict[str, Callable[[Any, dict[str, torch.Tensor], _PlanOptions, torch.Generator], ExportRecipe]] = {
    "module": _plan_module,
    "program": _plan_program,
    "kv": _plan_kv,
}


def _planner_for(model_or_ep: Any, kv_cache: bool) -> str:
    """Which planner parses this input."""
    if isinstance(model_or_ep, torch.export.ExportedProgram):
        if kv_cache:
            raise ExportError("kv_cache=True needs the eager nn.Module, not an ExportedProgram")
        return "program"
    if isinstance(model_or_ep, nn.Module):
        return "kv" if kv_cache else "module"
    raise ExportError(f"expected an nn.Module or torch.export.ExportedProgram, got {type(model_or_ep).__name__}")


def build_recipe(
    model_or_ep: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    *,
    dynamic: bool = True,
    kv_cache: bool = False,
    check_batch: int | None = None,
    check_seq: int | None = None,
    seed: int = 0,
) -> ExportRecipe:
    """Parse a model once into the :class:`ExportRecipe` every backend exports from.

    Run it with the model in eval mode (:func:`export` does); the recipe's reference and
    exportable share the user's module.
    """
    examples = _validate_examples(example_dict(model_or_ep, example_inputs))
    planner = PLANNERS[_planner_for(model_or_ep, kv_cache)]
    gen = torch.Generator().manual_seed(seed)
    return planner(model_or_ep, examples, _PlanOptions(dynamic, check_batch, check_seq), gen)


# --------------------------------------------------------------------------------------------
# Parity check
# --------------------------------------------------------------------------------------------


def _compare(
    got: Sequence[np.ndarray], want: Sequence[np.ndarray], names: Sequence[str], shapes: dict[str, tuple[int, ...]],
    rtol: float, atol: float, runtime: str,
) -> float:
    """Max |got - want| over all outputs; VerificationError past ``allclose(rtol, atol)``."""
    if len(got) != len(want):
        raise VerificationError(f"{runtime} returned {len(got)} outputs, PyTorch {len(want)} at shapes {shapes}")
    worst = 0.0
    for name, g, w in zip(names, got, want):
        g = np.asarray(g)
        if g.shape != w.shape:
            raise VerificationError(
                f"output {name!r}: {runtime} shape {g.shape} != PyTorch shape {w.shape} at input shapes {shapes}"
            )
        if g.size == 0:
            continue
        diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
        if not np.isfinite(diff):
            raise VerificationError(f"output {name!r}: non-finite difference at input shapes {shapes}")
        worst = max(worst, diff)
        if not np.allclose(g, w, rtol=rtol, atol=atol):
            raise VerificationError(
                f"{runtime} output {name!r} differs from PyTorch: max |diff| = {diff:.3e} "
                f"(rtol={rtol}, atol={atol}) at input shapes {shapes}"
            )
    return worst


def _check_parity(
    backend: ExportBackend, path: Path, recipe: ExportRecipe, device: str, rtol: float, atol: float
) -> float:
    """Run the written model and eager PyTorch on the check inputs; the max difference."""
    runtime = backend.runtime or backend.name
    shapes = recipe.check_shapes
    try:
        session = backend.session(path, device)
    except Exception as exc:
        raise VerificationError(f"{runtime} cannot load the exported model: {exc}") from exc
    feed = {n: to_numpy(t) for n, t in zip(recipe.input_names, recipe.check_inputs)}
    try:
        got = backend.run(session, feed)
    except Exception as exc:
        raise VerificationError(f"{runtime} failed at input shapes {shapes}: {exc}") from exc
    want = [to_numpy(t) for t in recipe.reference(list(recipe.check_inputs))]
    return _compare(got, want, recipe.output_names, shapes, rtol, atol, runtime)


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------


def export(
    model_or_ep: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike,
    *,
    backend: str | ExportBackend = "onnx",
    example_inputs: Any = None,
    dynamic: bool = True,
    kv_cache: bool = False,
    overwrite: bool = False,
    check: bool = True,
    check_batch: int | None = None,
    check_seq: int | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    device: str = "auto",
    **backend_options: Any,
) -> ExportResult:
    """Export to ``backend`` (a registered name or an :class:`ExportBackend`), atomically, verified.

    ``backend_options`` build the named backend (``optimize=False`` for ONNX).  Dynamic dims,
    ``kv_cache`` and the check shapes are described in :func:`export_onnx`; ``device`` is where
    the check runs (``auto``, ``cpu``, ``cuda``).  An existing ``path`` raises
    :class:`~fxprune.errors.OutputExistsError` before any work unless ``overwrite=True``; the
    files are written into a temporary directory next to ``path`` and published only after the
    check passed.
    """
    target = get_backend(backend, **backend_options)
    if not target.available():
        raise ExportError(f"export backend {target.name!r} is not available here: {target.requires or 'missing runtime'}")
    from fxprune.io import _sources_of

    publication = Publication(path, overwrite=overwrite, kind="files", what="export",
                              protect=_sources_of(model_or_ep))
    providers = target.providers(device)

    with eval_mode(model_or_ep), _experts_as(model_or_ep, target.experts_implementation) as switched:
        recipe = build_recipe(model_or_ep, example_inputs, dynamic=dynamic, kv_cache=kv_cache,
                              check_batch=check_batch, check_seq=check_seq)
        if switched:
            recipe = dataclasses.replace(recipe, notes=(*recipe.notes, switched))
        for note in recipe.notes:
            warnings.warn(note, stacklevel=2)
        with publication as pub:
            main = pub.tmp / pub.dest.name
            written = target.export(recipe, main)
            if not main.is_file():
                raise ExportError(f"export backend {target.name!r} did not write {main.name}")
            max_diff = _check_parity(target, main, recipe, device, rtol, atol) if check else None
            input_names, output_names = target.io_names(main, recipe)
            files = pub.files
            folder = pub.commit().parent

    return ExportResult(
        path=Path(path), input_names=input_names, output_names=output_names, max_abs_diff=max_diff,
        providers=providers, file_size=sum((folder / f).stat().st_size for f in files),
        external_data=len(written) > 1, check_shapes=recipe.check_shapes if check else {},
        notes=list(recipe.notes), backend=target.name, files=files,
    )


@contextlib.contextmanager
def _experts_as(model: Any, implementation: str | None) -> Iterator[str | None]:
    """Run an HF mixture of experts with the ``experts_implementation`` a backend needs, and put the
    model's own back afterwards; yields the note saying so (None when nothing changed)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    if (implementation is None or not isinstance(model, nn.Module) or not hasattr(model, "set_experts_implementation")
            or current in (None, implementation) or not _has_experts(model)):
        yield None
        return
    try:
        model.set_experts_implementation(implementation)
    except (ValueError, RuntimeError, AttributeError):  # a model that cannot switch exports as it is
        yield None
        return
    try:
        yield (f"experts exported with experts_implementation={implementation!r} (the model's {current!r} "
               "is not convertible by this backend); same weights, same outputs")
    finally:
        model.set_experts_implementation(current)


def _has_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds experts that dispatch on ``config._experts_implementation``
    (modules wrapped by transformers' ``use_experts_implementation``)."""
    return any(hasattr(m, "_is_expert_parallel") and hasattr(m, "is_concatenated") for m in model.modules())


def export_onnx(
    model_or_ep: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
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

    ``example_inputs`` follows torch.export's conventions (a tuple of positional args, a dict of
    keyword args, or ``(args, kwargs)``); None builds them from an HF model's config.

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
    return export(
        model_or_ep, path, backend="onnx", example_inputs=example_inputs, dynamic=dynamic, kv_cache=kv_cache,
        overwrite=overwrite, check=check, check_batch=check_batch, check_seq=check_seq, rtol=rtol, atol=atol,
        external_data=external_data, providers=providers, optimize=optimize,
    )
