"""Capture pass: trace an ``nn.Module`` with ``torch.export`` into an ATen graph.

Batch and sequence dims are dynamic by default, so the pruned program and its ONNX export serve
any shape.  Example inputs of size 1 on a dynamic dim are widened to 2 first: torch.export
specialises size-1 dims silently, and the program would then fail at batch 3.  A model on the
``meta`` device is traced without materialising a single weight (``meta_model``).
"""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from typing import Any, Callable

import torch

from fxprune.errors import BadInputError, CaptureError
from fxprune.graph import PrunableGraph
from fxprune.passes.base import check, fxpass
from fxprune.util.hf import default_constants, default_example_inputs  # noqa: F401 - re-exported
from fxprune.util.modules import eval_mode, forward_params
from fxprune.util.modules import on_meta as _on_meta

BATCH = "batch"
SEQ = "seq"


def meta_model(factory: Callable[..., torch.nn.Module], *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Build a model on the meta device: shapes and structure only, no weight memory.

    ``fxprune.meta_model(LlamaForCausalLM, config)`` builds a 70B-shaped Llama in seconds;
    ``trace`` and ``analyze`` then work on it as on a real one.
    """
    with torch.device("meta"):
        model = factory(*args, **kwargs)
    return model.eval()


def _requires(model: Any, *args: Any, **kwargs: Any) -> None:
    check(isinstance(model, torch.nn.Module), CaptureError, f"trace() needs an nn.Module, got {type(model).__name__}")
    kw = kwargs.get("kwargs")
    check(kw is None or isinstance(kw, dict), BadInputError,
          f"trace(kwargs=...) must be a dict of keyword inputs, got {type(kw).__name__}")


@fxpass("trace", requires=_requires)
def trace(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    dynamic: bool = True,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> PrunableGraph:
    """Trace ``model`` with torch.export and return the shared graph object.

    Args:
        model: any exportable module (Hugging Face models first). It is not modified.
        args, kwargs: example inputs. Tensors only, plus constants such as ``use_cache``.
        dynamic: make batch (dim 0 of every tensor) and sequence (dim 1 of integer/bool
            tensors of rank >= 2) dynamic. Ignored when ``dynamic_shapes`` is given.
        dynamic_shapes: an explicit torch.export ``dynamic_shapes`` spec.
        strict: passed to torch.export (non-strict tracing handles more Python).
    """
    kwargs = dict(kwargs or {})
    args = tuple(args)
    on_meta = _on_meta(model)
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constant_kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    constant_kwargs = default_constants(model, constant_kwargs)

    if dynamic and dynamic_shapes is None:
        args, tensor_kwargs = _widen_size_one(args, tensor_kwargs)
        dynamic_shapes = _auto_dynamic_shapes(model, args, tensor_kwargs, constant_kwargs)
    elif not dynamic:
        dynamic_shapes = None

    trace_args = tuple(_to_device(a, "meta") if on_meta else a for a in args)
    trace_kwargs = {k: (_to_device(v, "meta") if on_meta else v) for k, v in tensor_kwargs.items()}
    all_kwargs = {**trace_kwargs, **constant_kwargs}

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = model
        if dynamic and isinstance(dynamic_shapes, dict):
            target = _explicit_forward(model, trace_args, all_kwargs)
        try:
            ep = torch.export.export(
                target, trace_args, all_kwargs, dynamic_shapes=dynamic_shapes, strict=strict
            )
        except Exception as exc:  # noqa: BLE001 - re-raised with the reason and a way forward
            auto = _as_auto(dynamic_shapes) if dynamic and _is_constraint_violation(exc) else None
            if auto is None:
                raise CaptureError(_export_failure_message(model, exc)) from exc
            # The model bounds a dim (BERT: seq <= max positions): let export infer the range.
            try:
                ep = torch.export.export(target, trace_args, all_kwargs, dynamic_shapes=auto, strict=strict)
                dynamic_shapes = auto
            except Exception as exc2:  # noqa: BLE001
                raise CaptureError(_export_failure_message(model, exc2)) from exc2
    timings["export"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The analysis wants one flat ATen graph.  HF wraps RoPE in @torch.no_grad, which export
    # keeps as a wrap_with_set_grad_enabled higher-order op: inline those (cheap).  Anything
    # else higher-order falls back to run_decompositions({}), which keeps linear/sdpa/conv
    # intact but costs 1.5-2x the export itself on large models.
    if not inline_grad_mode_regions(ep):
        try:
            ep = ep.run_decompositions({})
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"torch.export traced {type(model).__name__} but lowering to ATen failed: {exc}") from exc
    _drop_dead_code(ep)
    timings["lower"] = time.perf_counter() - t0

    return PrunableGraph(
        exported_program=ep,
        module=model,
        example_args=args,
        example_kwargs=tensor_kwargs,
        constant_kwargs=constant_kwargs,
        dynamic_shapes=dynamic_shapes,
        aliases=_aliases(model),
        on_meta=on_meta,
        timings=timings,
    )


# ------------------------------------------------------------------------------------------
_INLINABLE = {"wrap_with_set_grad_enabled": 2, "wrap_with_autocast": 5}  # HOP -> index of first operand


def inline_grad_mode_regions(ep: Any) -> bool:
    """Inline grad-mode/autocast regions of an exported graph in place.

    Returns False (and changes nothing) when the graph holds other higher-order ops, so the
    caller can lower it another way.  Grad-mode only matters for training through the graph;
    fxprune scores gradients on the eager module, so dropping the no_grad wrapper is safe.
    """
    import operator

    gm = ep.graph_module
    graph = gm.graph
    hops = [n for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)]
    if any(h.target.__name__ not in _INLINABLE for h in hops):
        return False
    for hop in hops:
        first = _INLINABLE[hop.target.__name__]
        sub_node = hop.args[first - 1]
        sub = getattr(gm, sub_node.target)
        operands = list(hop.args[first:])
        env: dict = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, arg in zip(placeholders, operands):
            env[ph] = arg
        outputs = None
        with graph.inserting_before(hop):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    outputs = n.args[0]
                    continue
                if n.op == "get_attr":  # nested submodule or constant: copy the attribute over
                    name = f"_inlined_{sub_node.target}_{n.target}"
                    setattr(gm, name, getattr(sub, n.target))
                    new = graph.get_attr(name)
                else:
                    new = graph.node_copy(n, lambda x: env[x])
                new.meta = dict(n.meta)
                env[n] = new
        results = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
        for user in list(hop.users):
            if user.op == "call_function" and user.target is operator.getitem:
                repl = env[results[user.args[1]]] if isinstance(results[user.args[1]], torch.fx.Node) else results[user.args[1]]
                user.replace_all_uses_with(repl)
                graph.erase_node(user)
        if hop.users:  # a direct (non-getitem) use of a single output
            hop.replace_all_uses_with(env[results[0]])
        graph.erase_node(hop)
        if not sub_node.users:
            graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
    graph.lint()
    gm.recompile()
    return True


def _drop_dead_code(ep: Any) -> None:
    """Remove pure nodes whose values nothing reads (``nn.MultiheadAttention``'s head-averaged
    weights that a caller discards): a mean over heads that is never used must not make the
    heads inexact.  In-place ops and other side effects stay (``Node.is_impure``)."""
    gm = ep.graph_module
    if gm.graph.eliminate_dead_code():
        gm.recompile()


def _to_device(x: Any, device: str) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _widen_size_one(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Repeat size-1 batch/seq dims to 2 so torch.export keeps them dynamic."""
    widened: list[str] = []

    def widen(name: str, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        for dim in _dynamic_dims(t):
            if t.shape[dim] == 1:
                reps = [1] * t.dim()
                reps[dim] = 2
                t = t.repeat(*reps)
                widened.append(f"{name}[{dim}]")
        return t

    new_args = tuple(widen(f"arg{i}", a) for i, a in enumerate(args))
    new_kwargs = {k: widen(k, v) for k, v in kwargs.items()}
    if widened:
        warnings.warn(
            "fxprune: example inputs had size 1 on dynamic dims "
            f"{', '.join(widened)}; repeated them to size 2 so the trace stays dynamic "
            "(torch.export specialises size-1 dims).",
            stacklevel=4,
        )
    return new_args, new_kwargs


def _dynamic_dims(t: torch.Tensor) -> list[int]:
    """Batch is dim 0; sequence is dim 1 of token ids/masks ([b, s]) and of features ([b, s, d])."""
    dims = [0]
    if (t.dim() >= 2 and not t.is_floating_point()) or (t.dim() == 3 and t.is_floating_point()):
        dims.append(1)
    return dims


def _bind(model: Any, args: tuple, kwargs: dict) -> tuple[dict[str, inspect.Parameter], Any]:
    params = forward_params(model)
    try:
        return params, inspect.Signature(list(params.values())).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return params, None


def _explicit_forward(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.nn.Module:
    """``model`` itself, or, when its ``forward`` takes ``*args``/``**kwargs``, a view of it whose
    ``forward`` names each example input (same parameters, buffers and submodules, same FQNs).

    torch.export matches a ``dynamic_shapes`` dict to the signature, but cannot match one for
    inputs that reach ``**kwargs`` (it flattens them into the top level).  The view's signature
    has a positional-only parameter per ``*args`` value and a keyword-only one per ``**kwargs``
    entry, and calls the real ``forward`` with them unchanged.
    """
    params, bound = _bind(model, args, kwargs)
    if bound is None or not any(params[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                                for n in bound.arguments):
        return model
    new: list[inspect.Parameter] = []
    for name, value in bound.arguments.items():
        p = params[name]
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            new.extend(inspect.Parameter(f"{name}_{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(len(value)))
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            new.extend(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in value)
        else:
            keyword_only = p.kind is inspect.Parameter.KEYWORD_ONLY
            new.append(p if keyword_only else p.replace(default=inspect.Parameter.empty))  # every one is bound
    order = {inspect.Parameter.POSITIONAL_ONLY: 0, inspect.Parameter.POSITIONAL_OR_KEYWORD: 1,
             inspect.Parameter.KEYWORD_ONLY: 3}
    new.sort(key=lambda p: order[p.kind])
    real = model.forward

    def forward(*a: Any, **k: Any) -> Any:
        return real(*a, **k)

    forward.__signature__ = inspect.Signature(new)  # type: ignore[attr-defined]
    view = copy.copy(model)  # shares _parameters/_buffers/_modules: the same tensors, the same names
    view.forward = forward  # type: ignore[method-assign]
    return view


def _auto_dynamic_shapes(model: Any, args: tuple, kwargs: dict, constants: dict) -> Any:
    """The default spec: batch (and sequence) dims dynamic, one entry per named input.

    Binding the example inputs to ``forward``'s signature names every input, for any mix of
    positional, keyword, ``*args`` and ``**kwargs`` parameters (a generic wrapper's
    ``forward(*args, **kwargs)`` included); ``*args``/``**kwargs`` values are named the way
    :func:`_explicit_forward` names them.
    """
    batch = torch.export.Dim(BATCH, min=1, max=1 << 16)
    seq = torch.export.Dim(SEQ, min=1, max=1 << 17)

    def spec(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        dims = {}
        for d in _dynamic_dims(t):
            dims[d] = batch if d == 0 else seq
        return dims

    params, bound = _bind(model, args, {**kwargs, **constants})
    if bound is None or not params:
        if kwargs and not args:
            return {**{k: spec(v) for k, v in kwargs.items()}, **{k: None for k in constants}}
        if args and not kwargs and not constants:
            return tuple(spec(a) for a in args)
        return None
    shapes: dict[str, Any] = {}  # keyed like the signature of _explicit_forward's view
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes.update({f"{name}_{i}": spec(v) for i, v in enumerate(value)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes.update({k: spec(v) for k, v in value.items()})
        else:
            shapes[name] = spec(value)
    return shapes


def _is_constraint_violation(exc: BaseException) -> bool:
    """Whether export failed because the model bounds or relates the dims we made dynamic."""
    seen = 0
    while exc is not None and seen < 8:
        text = str(exc)
        if "Constraints violated" in text or "ConstraintViolation" in type(exc).__name__ or (
            "is not equal to" in text and "size()" in text
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _as_auto(spec: Any) -> Any:
    """The same dynamic dims, as Dim.AUTO (export infers their ranges instead of failing)."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        if spec and all(isinstance(k, int) for k in spec):
            return {d: torch.export.Dim.AUTO for d in spec}
        return {k: _as_auto(v) for k, v in spec.items()}
    if isinstance(spec, tuple):
        return tuple(_as_auto(v) for v in spec)
    return spec


def _export_failure_message(model: torch.nn.Module, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()
    head = "\n  ".join(reason[:6]) if reason else type(exc).__name__
    return (
        f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {head}\n"
        "Try other example inputs or kwargs (tensors of size >= 2 on batch/sequence dims, the "
        "kwargs your forward really uses, e.g. use_cache=False), dynamic=False, or an explicit "
        "dynamic_shapes spec."
    )


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """FQN -> all FQNs of the same tensor, so tied weights shrink together in the module."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
    out: dict[str, list[str]] = {}
    for names in by_id.values():
        for n in names:
            out[n] = names
    return out
