"""Per-op dimension rules for the analysis pass, in one registry keyed by ATen op.

A rule says how the index spaces (atoms) of an op's inputs map onto its output's, what the
rewrite must recompute (shape constants, offsets, group counts), how zeros flow through it, and
where it reduces over a space (which makes a group inexact).  Ops tagged ``pointwise`` in ATen
share one broadcasting rule; an op with no rule freezes every space it touches.

To support a new op, register a function ``rule(ctx, node)`` with ``@register_rule(op)``.
"""

from __future__ import annotations

import collections
import operator
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from fxprune.graph import source_location
from fxprune.passes.rules import (
    AnalysisContext,
    arg,
    flat_args,
    int_size,
    is_metadata_only,
    is_one,
    norm_dim,
    register_rule,
)
from fxprune.types import ArgPath, NormScale, Tag, TensorRef

aten = torch.ops.aten
TRef = TensorRef


def _trace_to_param(ctx: AnalysisContext, ref: TRef, depth: int = 0) -> bool:
    """Whether a tensor is a parameter seen through layout ops (a weight, not an activation)."""
    node = ctx.node_by_name[ref[0]]
    if node.target is aten.embedding.default:  # embedding(weight, ids): the weight is arg 0
        src = ctx.ref(node.args[0])
        return src is not None and _trace_to_param(ctx, src, depth + 1)
    if node.op == "placeholder":
        return ctx.zero_specs.get(ref) is not None and ctx.zero_specs[ref].kind == "param"
    if depth > 8 or node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    if packet in _LAYOUT_PACKETS and node.args and isinstance(node.args[0], fx.Node):
        src = ctx.ref(node.args[0])
        return src is not None and _trace_to_param(ctx, src, depth + 1)
    return False


# ------------------------------------------------------------------------------------------
# Identity-like and pointwise ops
# ------------------------------------------------------------------------------------------
@register_rule(
    "pointwise", aten.__and__, aten.__or__, aten.__xor__, aten.bitwise_and, aten.bitwise_or,
    aten.bitwise_xor, aten.where, aten.floor_divide, aten.remainder, aten.fmod, aten.masked_fill,
    aten.clamp_min, aten.clamp_max, aten.logical_and, aten.logical_or, aten.lerp, aten.addcmul,
    aten.addcdiv, aten.hardtanh, aten.leaky_relu, aten.elu, aten.softplus, aten.gelu, aten.silu,
    aten.mish, aten.hardswish, aten.hardsigmoid, aten.threshold,
)
def pointwise_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    out = ctx.out(node)
    inputs = [ctx.ref(a) for a in flat_args(node)]
    tensors = [r for r in inputs if r is not None]
    ctx.broadcast(out, tensors)
    ctx.zero_probe(out, tensors)


# Elementwise ops that ATen does not tag "pointwise": aliases that reach the graph undecomposed
# (``torch.multiply`` is ``aten.multiply.Tensor``), and complex-number constructors (RoPE's
# ``polar``).  Their zero behaviour is probed like any pointwise op's.
_UNTAGGED_POINTWISE = [
    "multiply", "divide", "subtract", "true_divide", "negative", "absolute", "rsub", "clip", "fix",
    "greater", "greater_equal", "less", "less_equal", "not_equal", "arccos", "arcsin", "arctan",
    "arccosh", "arcsinh", "arctanh", "arctan2", "special_expit", "special_exp2", "special_expm1",
    "special_log1p", "special_erf", "special_erfc", "special_erfinv", "special_logit",
    "special_sinc", "special_round", "special_xlogy", "polar", "complex", "angle", "sgn", "xlogy",
]
register_rule(*(getattr(aten, n) for n in _UNTAGGED_POINTWISE if hasattr(aten, n)))(pointwise_rule)


@register_rule(
    aten._to_copy, aten.alias, aten.clone, aten.contiguous, aten.detach, aten.lift_fresh_copy,
    aten.to, aten.type_as, aten.dropout, aten.feature_dropout, aten.alpha_dropout,
    aten.fill, aten.zero, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like,
    aten.randn_like, aten._assert_tensor_metadata, aten.positive, aten.resolve_conj, aten.resolve_neg,
    aten.conj, aten._conj, aten.conj_physical, aten.real, aten.imag,
)
def identity_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    outs = ctx.output_refs(node)
    if not outs:
        return
    out = outs[0]
    src = ctx.ref(node.args[0])
    if src is None:
        ctx.zero_never(out)
        return
    ctx.tie_all(out, src)
    if node.target.overloadpacket in (aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
                                      aten.rand_like, aten.randn_like, aten.fill, aten.zero):
        ctx.zero_never(out)
    else:
        ctx.zero_pass(out, [src])


@register_rule(aten.copy, aten.copy_)
def copy_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """copy(self, src) / self.copy_(src): the output has self's shape and src's values (broadcast).

    In place (``key[..., :12].copy_(k_nope)``) the written view's dims are its base's atoms, so
    this ties ``src`` into the base; the analysis handles what the write does to the base's values.
    """
    out, dst, src = ctx.out(node), ctx.ref(node.args[0]), ctx.ref(node.args[1])
    ctx.tie_all(out, dst)
    if src is None:
        ctx.zero_never(out)
        return
    ctx.broadcast(out, [dst, src])
    ctx.zero_pass(out, [src])


@register_rule(aten.native_dropout)
def native_dropout_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src = ctx.ref(node.args[0])
    for ref in ctx.output_refs(node):
        ctx.tie_all(ref, src)
    ctx.zero_pass((node.name, 0), [src])
    ctx.zero_never((node.name, 1))


# ------------------------------------------------------------------------------------------
# Layout ops: reshape family, permute, squeeze, expand, repeat
# ------------------------------------------------------------------------------------------
def _reshape_ties(ctx: AnalysisContext, src: TRef, out: TRef) -> None:
    """Line up input and output dims in chunks of equal product and tie their atoms."""
    in_shape, out_shape = ctx.shape(src), ctx.shape(out)
    in_dims = [i for i, s in enumerate(in_shape) if not is_one(s)]
    out_dims = [j for j, s in enumerate(out_shape) if not is_one(s)]
    chunks = _product_chunks([in_shape[i] for i in in_dims], [out_shape[j] for j in out_dims])
    if chunks is None:
        chunks = _peeled_chunks(ctx, src, out, in_dims, out_dims)
    for ci, cj in chunks:
        a_dims = [in_dims[i] for i in ci]
        b_dims = [out_dims[j] for j in cj]
        a_atoms = [a for i in a_dims for a in ctx.d(src)[i]]
        b_atoms = [a for j in b_dims for a in ctx.d(out)[j]]
        # dynamic chunks factor too ([B, H] <-> [B*H]); what does not freezes in unify_prod
        ctx.store.unify_prod(a_atoms, b_atoms)


def _peeled_chunks(ctx: AnalysisContext, src: TRef, out: TRef, in_dims: list[int],
                   out_dims: list[int]) -> list[tuple[list[int], list[int]]]:
    """Chunks of a reshape whose dynamic sizes sympy cannot factor (a sequence padded to a multiple
    of a chunk size): equal leading and trailing dims still correspond one to one (the products
    agree), so they are tied (heads, head dims); only the middle is frozen."""
    in_shape, out_shape = ctx.shape(src), ctx.shape(out)

    def same(i: int, j: int) -> bool:
        return sympy.simplify(sympy.sympify(in_shape[i]) - sympy.sympify(out_shape[j])) == 0

    lo = 0
    while lo < min(len(in_dims), len(out_dims)) - 1 and same(in_dims[lo], out_dims[lo]):
        lo += 1
    hi_a, hi_b = len(in_dims), len(out_dims)
    while hi_a - 1 > lo and hi_b - 1 > lo and same(in_dims[hi_a - 1], out_dims[hi_b - 1]):
        hi_a, hi_b = hi_a - 1, hi_b - 1
    reason = f"reshape {in_shape} -> {out_shape} at {out[0]} does not factor"
    for i in in_dims[lo:hi_a]:
        ctx.freeze_dim(src, i, reason)
    for j in out_dims[lo:hi_b]:
        ctx.freeze_dim(out, j, reason)
    pairs = list(zip(range(lo), range(lo))) + list(zip(range(hi_a, len(in_dims)), range(hi_b, len(out_dims))))
    return [([i], [j]) for i, j in pairs]


def _product_chunks(a: Sequence, b: Sequence) -> list[tuple[list[int], list[int]]] | None:
    """Split two size lists with equal products into minimal chunks of equal products."""
    chunks = []
    i = j = 0
    while i < len(a) and j < len(b):
        ci, cj = [i], [j]
        pa, pb = sympy.sympify(a[i]), sympy.sympify(b[j])
        i += 1
        j += 1
        guard = 0
        while sympy.simplify(pa - pb) != 0:
            guard += 1
            if guard > 64:
                return None
            ratio = sympy.simplify(pb / pa)
            num, den = sympy.fraction(ratio)
            if den == 1 and i < len(a):
                pa = pa * a[i]
                ci.append(i)
                i += 1
            elif j < len(b):
                pb = pb * b[j]
                cj.append(j)
                j += 1
            elif i < len(a):
                pa = pa * a[i]
                ci.append(i)
                i += 1
            else:
                return None
        chunks.append((ci, cj))
    if i != len(a) or j != len(b):
        return None
    return chunks


@register_rule(aten.view, aten._unsafe_view, aten.reshape, aten.view_copy, aten.unflatten, aten.flatten)
def reshape_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    _reshape_ties(ctx, src, out)
    ctx.zero_pass(out, [src])
    packet = node.target.overloadpacket
    if packet in (aten.view, aten._unsafe_view, aten.reshape, aten.view_copy):
        ctx.shape_args(node, ArgPath("args", 1), node.args[1], out)
    elif packet is aten.unflatten:
        dim = norm_dim(node.args[1], ctx.rank(src))
        ctx.shape_args(node, ArgPath("args", 2), node.args[2], out, dim)


@register_rule(aten.permute, aten.permute_copy)
def permute_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    for i, d in enumerate(node.args[1]):
        ctx.tie(out, i, src, norm_dim(d, rank))
    ctx.zero_pass(out, [src])


@register_rule(aten.transpose, aten.transpose_copy, aten.t, aten.numpy_T, aten.swapaxes, aten.swapdims)
def transpose_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    if node.target.overloadpacket in (aten.t, aten.numpy_T):
        perm = list(reversed(range(rank)))
    else:
        a, b = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    for i, d in enumerate(perm):
        ctx.tie(out, i, src, d)
    ctx.zero_pass(out, [src])


@register_rule(aten.unsqueeze, aten.squeeze, aten.unsqueeze_copy, aten.squeeze_copy)
def squeeze_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    a = [i for i, s in enumerate(ctx.shape(src)) if not is_one(s)]
    b = [j for j, s in enumerate(ctx.shape(out)) if not is_one(s)]
    if len(a) != len(b):
        ctx.unsupported_op(node, "squeeze of a dynamic dim")
        return
    for i, j in zip(a, b):
        ctx.tie(src, i, out, j)
    ctx.zero_pass(out, [src])


@register_rule(aten.expand, aten.expand_copy, aten.broadcast_to, aten.expand_as)
def expand_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    ri, ro = ctx.rank(src), ctx.rank(out)
    for k in range(1, ro + 1):
        so = ctx.shape(out)[ro - k]
        si = ctx.shape(src)[ri - k] if k <= ri else 1
        if k <= ri and not is_one(si):
            ctx.tie(src, ri - k, out, ro - k)
        elif not is_one(so):
            ctx.tag(out, ro - k, Tag.BROADCAST)
            ctx.fresh(out, ro - k)
    sizes = node.args[1]
    if isinstance(sizes, (list, tuple)):  # expand_as takes a tensor: its shape follows by itself
        ctx.shape_args(node, ArgPath("args", 1), sizes, out)
    ctx.zero_pass(out, [src])


@register_rule(aten.view_as, aten.reshape_as)
def reshape_as_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    _reshape_ties(ctx, src, out)
    ctx.zero_pass(out, [src])


@register_rule(aten.movedim, aten.moveaxis)
def movedim_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    source, dest = node.args[1], node.args[2]
    source = [source] if isinstance(source, int) else list(source)
    dest = [dest] if isinstance(dest, int) else list(dest)
    source = [norm_dim(d, rank) for d in source]
    dest = [norm_dim(d, rank) for d in dest]
    perm = [-1] * rank
    for sdim, ddim in zip(source, dest):
        perm[ddim] = sdim
    rest = iter(d for d in range(rank) if d not in source)
    perm = [p if p >= 0 else next(rest) for p in perm]
    for i, d in enumerate(perm):
        ctx.tie(out, i, src, d)
    ctx.zero_pass(out, [src])


@register_rule(aten.repeat)
def repeat_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    repeats = list(node.args[1])
    ri, ro = ctx.rank(src), ctx.rank(out)
    for k in range(1, ro + 1):
        r = repeats[ro - k]
        in_atoms = ctx.d(src)[ri - k] if k <= ri else []
        if isinstance(r, fx.Node):  # a dynamic count (DeBERTa: q.size(0) // heads)
            size_in = ctx.shape(src)[ri - k] if k <= ri else 1
            rep = ctx.store.new(sympy.simplify(sympy.sympify(ctx.shape(out)[ro - k]) / sympy.sympify(size_in)))
            ctx.store.tag([rep], Tag.BROADCAST)
            ctx.store.unify_prod(ctx.d(out)[ro - k], [rep, *in_atoms])
            ctx.symbolic_size(node, ArgPath("args", 1, ro - k), r, [rep])
            continue
        if not isinstance(r, int):
            ctx.freeze_dim(out, ro - k, "symbolic repeat")
            continue
        if r == 1:
            if k <= ri:
                ctx.tie(src, ri - k, out, ro - k)
            continue
        rep = ctx.store.new(r)
        ctx.store.tag([rep], Tag.BROADCAST)
        ctx.store.unify_prod(ctx.d(out)[ro - k], [rep, *in_atoms])
        ctx.size_arg_atoms(node, ArgPath("args", 1, ro - k), [rep])
    ctx.zero_pass(out, [src])


@register_rule(aten.repeat_interleave)
def repeat_interleave_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    repeats = arg(node, 1, "repeats")
    if node.target is not aten.repeat_interleave.self_int or not isinstance(repeats, int):
        ctx.unsupported_op(node, "tensor repeats")
        return
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    dim = arg(node, 2, "dim")
    if dim is None:
        ctx.unsupported_op(node, "flattening repeat_interleave")
        return
    dim = norm_dim(dim, ctx.rank(src))
    for i in range(ctx.rank(src)):
        if i != dim:
            ctx.tie(src, i, out, i)
    rep = ctx.store.new(repeats) if repeats > 1 else None
    parts = list(ctx.d(src)[dim]) + ([rep] if rep is not None else [])
    if rep is not None:
        ctx.store.tag([rep], Tag.BROADCAST)
        ctx.size_arg_atoms(node, ArgPath("args", 1), [rep])
    ctx.store.unify_prod(ctx.d(out)[dim], parts)
    if arg(node, 3, "output_size") is not None:
        path = ArgPath("args", 3) if len(node.args) > 3 else ArgPath("kwargs", "output_size")
        ctx.size_arg(node, path, out, dim)
    ctx.zero_pass(out, [src])


@register_rule(aten.view_as_complex)
def view_as_complex_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """[..., n, 2] real -> [..., n] complex (complex RoPE): the (re, im) pair dim is one unit."""
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    ctx.freeze_dim(src, rank - 1, f"real and imaginary parts at {node.name}")
    for i in range(rank - 1):
        ctx.tie(src, i, out, i)
    ctx.zero_pass(out, [src])


@register_rule(aten.view_as_real)
def view_as_real_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """[..., n] complex -> [..., n, 2] real; ``.flatten(-2)`` then makes each complex unit a pair
    of adjacent reals, so a RoPE frequency removes both of its rotated coordinates."""
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    for i in range(rank):
        ctx.tie(src, i, out, i)
    ctx.fresh(out, rank)
    ctx.freeze_dim(out, rank, f"real and imaginary parts at {node.name}")
    ctx.zero_pass(out, [src])


@register_rule(aten.pixel_shuffle, aten.pixel_unshuffle)
def pixel_shuffle_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """pixel_shuffle: [*, C*r*r, H, W] -> [*, C, H*r, W*r]; unshuffle is the inverse.

    The channel dim is the product (C, r, r) row-major; the two r factors become sub-pixel
    positions, so they are frozen and C is what prunes (r*r input channels per unit).
    """
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    r = int(node.args[1])
    rank = ctx.rank(src)
    c = rank - 3
    for i in range(c):
        ctx.tie(src, i, out, i)
    shuffle = node.target.overloadpacket is aten.pixel_shuffle
    packed, plain = (src, out) if shuffle else (out, src)
    phases = [ctx.store.new(r, frozen=f"sub-pixel position at {node.name}") for _ in range(2)] if r > 1 else []
    ctx.store.unify_prod(ctx.d(packed)[c], [*ctx.d(plain)[c], *phases])
    for t in (src, out):
        for i in (c + 1, c + 2):
            ctx.freeze_dim(t, i, f"spatial position at {node.name}")
    if not shuffle:
        ctx.fresh(out, c)
    ctx.zero_pass(out, [src])


@register_rule(aten.glu)
def glu_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """glu(x, dim) = a * sigmoid(b) with [a | b] the two halves of dim: both halves are the output's space."""
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    dim = norm_dim(arg(node, 1, "dim", -1), rank)
    for i in range(rank):
        if i != dim:
            ctx.tie(src, i, out, i)
    n = int_size(ctx, src, dim)
    if n is None or n % 2:
        ctx.freeze_dim(src, dim, f"glu of a dynamic or odd dim at {node.name}")
        ctx.freeze_dim(out, dim, f"glu of a dynamic or odd dim at {node.name}")
    else:
        for lo in (0, n // 2):
            parts = ctx.store.carve(ctx.d(src)[dim], lo, lo + n // 2)
            if parts is None:
                ctx.freeze_dim(out, dim, f"glu at {node.name} cuts across atoms")
                break
            ctx.store.unify_prod(ctx.d(out)[dim], [ctx.store.make("sum", parts)])
    ctx.zero_pass(out, [src])


# ------------------------------------------------------------------------------------------
# Offsets: slice, select, cat, split, stack, pad
# ------------------------------------------------------------------------------------------
_INT_MAX = 2**62


def _slice_into(ctx: AnalysisContext, node: fx.Node, base: TRef, part: TRef, dim: int, start: Any, end: Any,
                step: Any, start_path: ArgPath, end_path: ArgPath) -> None:
    """``part`` is base[start:end:step] along ``dim`` (every other dim is shared): carve and tie."""
    rank = ctx.rank(base)
    for i in range(rank):
        if i != dim:
            ctx.tie(base, i, part, i)
    n = int_size(ctx, base, dim)
    if n is None or not all(isinstance(v, (int, type(None))) for v in (start, end, step)):
        ctx.freeze_dim(base, dim, f"dynamic slice at {node.name}")
        ctx.freeze_dim(part, dim, f"dynamic slice at {node.name}")
        return
    lo, hi, step = slice(start, end, step).indices(n)
    if step != 1:
        ctx.freeze_dim(base, dim, f"strided slice at {node.name}")
        ctx.freeze_dim(part, dim, f"strided slice at {node.name}")
        return
    if lo == 0 and hi == n:
        ctx.tie(base, dim, part, dim)
        return
    parts = ctx.store.carve(ctx.d(base)[dim], lo, hi)
    if parts is None:
        ctx.freeze_dim(part, dim, f"slice at {node.name} cuts across atoms")
        return
    if hi > lo:
        ctx.store.unify_prod(ctx.d(part)[dim], [ctx.store.make("sum", parts)] if len(parts) > 1 else parts)
    if start is not None and lo != 0:
        ctx.offset_arg(node, start_path, base, dim, lo)
    if end is not None and hi != n:
        ctx.offset_arg(node, end_path, base, dim, hi)


def _arg_path(node: fx.Node, i: int, name: str) -> ArgPath:
    return ArgPath("args", i) if len(node.args) > i else ArgPath("kwargs", name)


@register_rule(aten.slice, aten.slice_copy)
def slice_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    dim = norm_dim(arg(node, 1, "dim", 0), rank)
    start = arg(node, 2, "start", None)
    end = arg(node, 3, "end", None)
    step = arg(node, 4, "step", 1)
    ctx.zero_pass(out, [src])
    n = int_size(ctx, src, dim)
    static = n is not None and all(isinstance(v, (int, type(None))) for v in (start, end, step))
    if not static or step == 1:
        _slice_into(ctx, node, src, out, dim, start, end, step, ArgPath("args", 2), ArgPath("args", 3))
        return
    for i in range(rank):
        if i != dim:
            ctx.tie(src, i, out, i)
    # strided slice: [n] = [n/step, step]; selecting one phase of the inner atom
    lo, hi, step = slice(start, end, step).indices(n)
    count = len(range(lo, hi, step))
    if n % step == 0 and lo < step and count == n // step:
        outer, phase = ctx.store.new(n // step), ctx.store.new(step)
        ctx.store.freeze([phase], f"strided slice phase at {node.name}")
        ctx.store.unify_prod(ctx.d(src)[dim], [outer, phase])
        ctx.store.unify_prod(ctx.d(out)[dim], [outer])
        return
    ctx.freeze_dim(src, dim, f"irregular strided slice at {node.name}")
    ctx.freeze_dim(out, dim, f"irregular strided slice at {node.name}")


@register_rule(aten.narrow, aten.narrow_copy)
def narrow_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """narrow(x, dim, start, length): a slice whose length is a size argument."""
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    dim, start, length = norm_dim(node.args[1], rank), node.args[2], node.args[3]
    for i in range(rank):
        if i != dim:
            ctx.tie(src, i, out, i)
    ctx.zero_pass(out, [src])
    n = int_size(ctx, src, dim)
    if n is None or not isinstance(start, int) or not isinstance(length, int):
        ctx.freeze_dim(src, dim, f"dynamic narrow at {node.name}")
        ctx.freeze_dim(out, dim, f"dynamic narrow at {node.name}")
        return
    start = start + n if start < 0 else start
    if start == 0 and length == n:
        ctx.tie(src, dim, out, dim)
        return
    parts = ctx.store.carve(ctx.d(src)[dim], start, start + length)
    if parts is None:
        ctx.freeze_dim(out, dim, f"narrow at {node.name} cuts across atoms")
        return
    ctx.store.unify_prod(ctx.d(out)[dim], [ctx.store.make("sum", parts)] if len(parts) > 1 else parts)
    if start:
        ctx.offset_arg(node, ArgPath("args", 2), src, dim, start)
    ctx.size_arg(node, ArgPath("args", 3), out, dim)


@register_rule(aten.select, aten.select_copy)
def select_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    dim = norm_dim(node.args[1], rank)
    ctx.freeze_dim(src, dim, f"select of one position at {node.name}")
    rest = [i for i in range(rank) if i != dim]
    for j, i in enumerate(rest):
        ctx.tie(src, i, out, j)
    ctx.zero_pass(out, [src])


@register_rule(aten.slice_scatter)
def slice_scatter_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """slice_scatter(self, src, dim, start, end, step): self with a slice replaced by src (what
    functionalisation makes of ``x[..., a:b].copy_(src)``)."""
    base, src, out = ctx.ref(node.args[0]), ctx.ref(node.args[1]), ctx.out(node)
    dim = norm_dim(arg(node, 2, "dim", 0), ctx.rank(base))
    ctx.tie_all(out, base)
    _slice_into(ctx, node, base, src, dim, arg(node, 3, "start"), arg(node, 4, "end"), arg(node, 5, "step", 1),
                _arg_path(node, 3, "start"), _arg_path(node, 4, "end"))
    ctx.zero_pass(out, [base, src])


@register_rule(aten.select_scatter)
def select_scatter_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    base, src, out = ctx.ref(node.args[0]), ctx.ref(node.args[1]), ctx.out(node)
    rank = ctx.rank(base)
    dim = norm_dim(node.args[2], rank)
    ctx.tie_all(out, base)
    ctx.freeze_dim(base, dim, f"select of one position at {node.name}")
    for j, i in enumerate(i for i in range(rank) if i != dim):
        ctx.tie(base, i, src, j)
    ctx.zero_pass(out, [base, src])


@register_rule(aten.unbind, aten.unbind_copy)
def unbind_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src = ctx.ref(node.args[0])
    rank = ctx.rank(src)
    dim = norm_dim(arg(node, 1, "dim", 0), rank)
    ctx.freeze_dim(src, dim, f"unbind at {node.name}")
    rest = [i for i in range(rank) if i != dim]
    for out in ctx.output_refs(node):
        for j, i in enumerate(rest):
            ctx.tie(src, i, out, j)
        ctx.zero_pass(out, [src])


@register_rule(aten.cat, aten.concat, aten.concatenate)
def cat_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    out = ctx.out(node)
    rank = ctx.rank(out)
    dim = norm_dim(arg(node, 1, "dim", 0), rank)
    inputs = [ctx.ref(t) for t in node.args[0]]
    inputs = [r for r in inputs if r is not None and ctx.rank(r) == rank]
    for r in inputs:
        for i in range(rank):
            if i != dim:
                ctx.tie(r, i, out, i)
    ctx.zero_pass(out, inputs)
    sizes = [ctx.shape(r)[dim] for r in inputs]
    if not all(isinstance(s, int) for s in sizes):
        ctx.freeze_dim(out, dim, f"concat of dynamic dims at {node.name}")
        for r in inputs:
            ctx.freeze_dim(r, dim, f"concat of dynamic dims at {node.name}")
        return
    parts = []
    for r, s in zip(inputs, sizes):
        if s == 0:
            continue
        atoms = ctx.d(r)[dim]
        if not atoms:  # a size-1 piece: an offset position that cannot be removed
            one = ctx.store.new(1, frozen=f"single position in concat at {node.name}")
            parts.append(one)
        else:
            parts.append(ctx.store.make("prod", atoms))
    if parts:
        ctx.store.unify_prod(ctx.d(out)[dim], [ctx.store.make("sum", parts)])


@register_rule(aten.split, aten.split_with_sizes, aten.split_copy, aten.split_with_sizes_copy,
               aten.chunk, aten.tensor_split)
def split_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src = ctx.ref(node.args[0])
    rank = ctx.rank(src)
    dim = norm_dim(arg(node, 2, "dim", 0), rank)
    outs = ctx.output_refs(node)
    n = int_size(ctx, src, dim)
    for out in outs:
        for i in range(rank):
            if i != dim:
                ctx.tie(src, i, out, i)
        ctx.zero_pass(out, [src])
    if n is None:
        ctx.freeze_ref(src, f"split of a dynamic dim at {node.name}")
        return
    offset = 0
    for k, out in enumerate(outs):
        size = ctx.shape(out)[dim]
        parts = ctx.store.carve(ctx.d(src)[dim], offset, offset + size) if size else []
        if parts:
            ctx.store.unify_prod(ctx.d(out)[dim], [ctx.store.make("sum", parts)] if len(parts) > 1 else parts)
        elif size:
            ctx.freeze_dim(out, dim, f"split at {node.name} cuts across atoms")
        ctx.size_arg(node, ArgPath("split", k), out, dim)
        offset += size


@register_rule(aten.stack)
def stack_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    out = ctx.out(node)
    rank = ctx.rank(out)
    dim = norm_dim(arg(node, 1, "dim", 0), rank)
    inputs = [ctx.ref(t) for t in node.args[0]]
    for r in inputs:
        rest = [i for i in range(rank) if i != dim]
        for j, i in enumerate(rest):
            ctx.tie(r, j, out, i)
    ctx.freeze_dim(out, dim, f"stack positions at {node.name}")
    ctx.zero_pass(out, inputs)


@register_rule(aten.constant_pad_nd, aten.pad, aten.reflection_pad1d, aten.reflection_pad2d,
               aten.replication_pad1d, aten.replication_pad2d)
def pad_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    pad = list(node.args[1])
    padded = {rank - 1 - k // 2 for k in range(len(pad)) if pad[k] != 0}
    for i in range(rank):
        if i in padded:
            ctx.freeze_dim(src, i, f"padding at {node.name}")
            ctx.freeze_dim(out, i, f"padding at {node.name}")
        else:
            ctx.tie(src, i, out, i)
    ctx.zero_never(out)


@register_rule(aten.flip, aten.roll)
def flip_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    dims = node.args[1] if node.target.overloadpacket is aten.flip else arg(node, 2, "dims", [])
    dims = {norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if not dims and node.target.overloadpacket is aten.roll:
        ctx.freeze_ref(src, "roll over the flattened tensor")
        ctx.freeze_ref(out, "roll over the flattened tensor")
        return
    for i in range(rank):
        if i in dims:
            ctx.freeze_dim(src, i, f"position-dependent op at {node.name}")
            ctx.freeze_dim(out, i, f"position-dependent op at {node.name}")
        else:
            ctx.tie(src, i, out, i)
    ctx.zero_pass(out, [src])


@register_rule(aten.tril, aten.triu)
def tri_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(src)
    for i in range(rank):
        if i >= rank - 2:
            ctx.freeze_dim(src, i, f"position-dependent op at {node.name}")
        ctx.tie(src, i, out, i)
    ctx.zero_pass(out, [src])


# ------------------------------------------------------------------------------------------
# Contractions
# ------------------------------------------------------------------------------------------
def _attention_tags(ctx: AnalysisContext, a: TRef, b: TRef, a_dims: Sequence[int], contract_dim: int) -> None:
    """An activation x activation matmul is attention: its batch dims are heads."""
    if _trace_to_param(ctx, a) or _trace_to_param(ctx, b):
        return
    ctx.attention_values.append(b)
    if len(a_dims) >= 1:
        ctx.tag(a, a_dims[-1], Tag.HEADS)
    ctx.tag(a, contract_dim, Tag.HEAD_DIM)
    ctx.tag(b, ctx.rank(b) - 1, Tag.HEAD_DIM)  # probs @ v: v's free dim is the value head dim


@register_rule(aten.linear)
def linear_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    x, w = ctx.ref(node.args[0]), ctx.ref(node.args[1])
    b = ctx.ref(arg(node, 2, "bias"))
    out = ctx.out(node)
    rx = ctx.rank(x)
    for i in range(rx - 1):
        ctx.tie(x, i, out, i)
    if ctx.rank(w) == 2:
        ctx.tie(x, rx - 1, w, 1)
        ctx.tie(out, rx - 1, w, 0)
        if b is not None:
            ctx.tie(out, rx - 1, b, 0)
        ctx.contraction(w, 1, [x, w], f"linear at {node.name}")
    else:  # 1-D weight: a dot product over the last dim
        ctx.tie(x, rx - 1, w, 0)
        ctx.contraction(w, 0, [x, w], f"linear at {node.name}")
    ctx.zero_contract(out, [x, w], [b] if b is not None else [])


def _matmul_dims(ctx: AnalysisContext, a: TRef, b: TRef, out: TRef, bias: TRef | None, name: str) -> None:
    ra, rb, ro = ctx.rank(a), ctx.rank(b), ctx.rank(out)
    if ra == 1 and rb == 1:
        ctx.tie(a, 0, b, 0)
        ctx.contraction(a, 0, [a, b], f"dot at {name}")
    elif ra == 1:
        ctx.tie(a, 0, b, rb - 2)
        ctx.contraction(a, 0, [a, b], f"matmul at {name}")
        for i in range(rb - 2):
            ctx.tie(b, i, out, i)
        ctx.tie(b, rb - 1, out, ro - 1)
    elif rb == 1:
        ctx.tie(a, ra - 1, b, 0)
        ctx.contraction(b, 0, [a, b], f"matmul at {name}")
        for i in range(ra - 1):
            ctx.tie(a, i, out, i)
    else:
        ctx.tie(a, ra - 1, b, rb - 2)
        ctx.contraction(a, ra - 1, [a, b], f"matmul at {name}")
        ctx.tie(a, ra - 2, out, ro - 2)
        ctx.tie(b, rb - 1, out, ro - 1)
        for k in range(3, ro + 1):  # broadcast batch dims
            for t, r in ((a, ra), (b, rb)):
                if k <= r and not is_one(ctx.shape(t)[r - k]):
                    ctx.tie(t, r - k, out, ro - k)
        batch = list(range(ra - 2))
        _attention_tags(ctx, a, b, batch, ra - 1)
    if bias is not None:
        ctx.broadcast(out, [bias])
    ctx.zero_contract(out, [a, b], [bias] if bias is not None else [])


@register_rule(aten.mm, aten.bmm, aten.matmul, aten.mv, aten.dot)
def matmul_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    a, b = ctx.ref(node.args[0]), ctx.ref(node.args[1])
    _matmul_dims(ctx, a, b, ctx.out(node), None, node.name)


@register_rule(aten.addmm, aten.baddbmm, aten.addmv)
def addmm_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    bias, a, b = (ctx.ref(x) for x in node.args[:3])
    beta = arg(node, 3, "beta", 1)
    _matmul_dims(ctx, a, b, ctx.out(node), bias if beta != 0 else None, node.name)


@register_rule(aten.outer, aten.ger)
def outer_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """outer(a, b)[i, j] = a[i] * b[j] (RoPE's frequencies from ``inv_freq``)."""
    a, b, out = ctx.ref(node.args[0]), ctx.ref(node.args[1]), ctx.out(node)
    ctx.tie(a, 0, out, 0)
    ctx.tie(b, 0, out, 1)
    ctx.zero_contract(out, [a, b])


_ELLIPSIS_LETTERS = [chr(0x3B1 + k) for k in range(24)]  # stand-ins for the dims "..." covers


def einsum_specs(eq: str, ranks: Sequence[int]) -> tuple[list[str], str] | None:
    """Operand and output index strings of an einsum equation with "..." and an implicit output
    expanded (``"...ij,...jk"`` -> ``["αij", "αjk"], "αik"``); None when it does not parse."""
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(ranks):
        return None
    n_ell = [r - (len(sp) - 3) if "..." in sp else 0 for sp, r in zip(specs, ranks)]
    width = max(n_ell, default=0)
    if width > len(_ELLIPSIS_LETTERS) or min(n_ell, default=0) < 0:
        return None
    ell = "".join(_ELLIPSIS_LETTERS[:width])
    specs = [sp.replace("...", ell[width - k:]) for sp, k in zip(specs, n_ell)]
    if any(len(sp) != r for sp, r in zip(specs, ranks)):
        return None
    if arrow:
        rhs = rhs.replace("...", ell)
    else:  # implicit output: the broadcast dims, then the letters used once, sorted
        counts = collections.Counter("".join(specs))
        rhs = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    return specs, rhs


@register_rule(aten.einsum)
def einsum_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """einsum: equal letters are one space (a letter repeated in one operand ties its two dims, a
    diagonal); letters missing from the output are contracted.  "..." broadcasts right-aligned."""
    operands = [ctx.ref(t) for t in node.args[1]]
    parsed = einsum_specs(node.args[0], [ctx.rank(r) for r in operands]) if None not in operands else None
    if parsed is None:
        ctx.unsupported_op(node, f"einsum equation {node.args[0]!r} does not parse")
        return
    specs, rhs = parsed
    out = ctx.out(node)
    first: dict[str, tuple[TRef, int]] = {}
    for ref, spec in zip(operands, specs):
        for i, letter in enumerate(spec):
            if is_one(ctx.shape(ref)[i]):
                continue
            if letter in first:
                ctx.tie(first[letter][0], first[letter][1], ref, i)
            else:
                first[letter] = (ref, i)
    for j, letter in enumerate(rhs):
        if letter in first:
            ctx.tie(first[letter][0], first[letter][1], out, j)
        else:
            ctx.fresh(out, j)
    for letter, (ref, i) in first.items():
        if letter not in rhs:
            ctx.contraction(ref, i, operands, f"einsum at {node.name}")
    ctx.zero_contract(out, operands)


def _conv_rule(ctx: AnalysisContext, node: fx.Node, transposed: bool, groups: int, groups_path: ArgPath) -> None:
    x, w = ctx.ref(node.args[0]), ctx.ref(node.args[1])
    b = ctx.ref(arg(node, 2, "bias"))
    out = ctx.out(node)
    rank = ctx.rank(x)
    ctx.tie(x, 0, out, 0)
    for i in range(2, rank):
        ctx.freeze_dim(x, i, f"conv spatial position at {node.name}")
        ctx.freeze_dim(out, i, f"conv spatial position at {node.name}")
    w_in, w_out = (0, 1) if transposed else (1, 0)
    for i in range(2, ctx.rank(w)):
        ctx.freeze_dim(w, i, f"conv kernel position at {node.name}")
    if groups == 1:
        ctx.tie(x, 1, w, w_in)
        ctx.tie(out, 1, w, w_out)
        if b is not None:
            ctx.tie(out, 1, b, 0)
    else:
        st = ctx.store
        g_atom = st.new(groups)
        ci = ctx.shape(w)[w_in] if not transposed else ctx.shape(x)[1] // groups
        co = ctx.shape(out)[1] // groups
        ci_atoms = [st.new(ci)] if ci > 1 else []
        co_atoms = [st.new(co)] if co > 1 else []
        st.unify_prod(ctx.d(x)[1], [g_atom, *ci_atoms])
        st.unify_prod(ctx.d(out)[1], [g_atom, *co_atoms])
        if transposed:
            st.unify_prod(ctx.d(w)[0], [g_atom, *ci_atoms])
            st.unify_prod(ctx.d(w)[1], co_atoms)
        else:
            st.unify_prod(ctx.d(w)[1], ci_atoms)
            st.unify_prod(ctx.d(w)[0], [g_atom, *co_atoms])
        if b is not None:
            ctx.tie(out, 1, b, 0)
        ctx.size_arg_atoms(node, groups_path, [g_atom])
    ctx.contraction(w, w_in, [x, w], f"conv at {node.name}")
    ctx.zero_contract(out, [x, w], [b] if b is not None else [])


@register_rule(aten.convolution, aten._convolution)
def convolution_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    transposed = bool(node.args[6])
    _conv_rule(ctx, node, transposed, int(node.args[8]), ArgPath("args", 8))


@register_rule(aten.conv1d, aten.conv2d, aten.conv3d)
def conv_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    groups = arg(node, 6, "groups", 1)
    path = ArgPath("args", 6) if len(node.args) > 6 else ArgPath("kwargs", "groups")
    _conv_rule(ctx, node, False, int(groups), path)


@register_rule(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def conv_transpose_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    groups = arg(node, 6, "groups", 1)
    path = ArgPath("args", 6) if len(node.args) > 6 else ArgPath("kwargs", "groups")
    _conv_rule(ctx, node, True, int(groups), path)


@register_rule("transformers.grouped_mm_fallback.default", aten._grouped_mm)
def grouped_mm_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """MoE grouped matmul: rows of x (sorted by expert, split at offsets) times per-expert W.

    x [N, K] @ w [E, K, M] -> out [N, M].  K is contracted, M is the expert FFN width; the
    expert axis E is indexed by the offsets and stays frozen.
    """
    x, w = ctx.ref(node.args[0]), ctx.ref(node.args[1])
    out = ctx.out(node)
    if ctx.rank(x) != 2 or ctx.rank(w) != 3 or ctx.rank(out) != 2:
        ctx.unsupported_op(node, "grouped_mm with unexpected ranks")
        return
    ctx.tie(x, 0, out, 0)
    ctx.tie(x, 1, w, 1)
    ctx.tie(w, 2, out, 1)
    offs = ctx.ref(arg(node, 2, "offs"))
    if offs is not None and ctx.rank(offs) == 1 and _routed(ctx, offs, 0) and ctx.shape(offs)[0] == ctx.shape(w)[0]:
        ctx.tie(w, 0, offs, 0)  # offsets count the rows routed to each expert: removing one drops its rows
        ctx.routing.append(("grouped_mm", (node.name, offs.node)))
    else:
        ctx.freeze_dim(w, 0, f"experts selected by offsets at {node.name}")
    ctx.contraction(w, 1, [x, w], f"grouped matmul at {node.name}")
    ctx.zero_contract(out, [x, w])


@register_rule(aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu)
def sdpa_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    q, k, v = (ctx.ref(a) for a in node.args[:3])
    mask = ctx.ref(arg(node, 3, "attn_mask"))
    outs = ctx.output_refs(node)
    out = outs[0]
    rq, rk = ctx.rank(q), ctx.rank(k)
    ctx.attention_nodes.append(node.name)
    ctx.attention_values.append(v)
    # leading batch dims
    for i in range(rq - 3):
        for t in (k, v):
            if not is_one(ctx.shape(t)[i]) and not is_one(ctx.shape(q)[i]):
                ctx.tie(q, i, t, i)
        ctx.tie(q, i, out, i)
    if rq >= 3:
        hq, hk = ctx.shape(q)[rq - 3], ctx.shape(k)[rk - 3]
        ctx.tie(k, rk - 3, v, rk - 3)
        ctx.tie(q, rq - 3, out, rq - 3)
        if hq == hk:
            ctx.tie(q, rq - 3, k, rk - 3)
        elif isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0:
            rep = ctx.store.new(hq // hk)
            ctx.store.tag([rep], Tag.BROADCAST)
            ctx.store.unify_prod(ctx.d(q)[rq - 3], [*ctx.d(k)[rk - 3], rep])
        else:
            ctx.freeze_dim(q, rq - 3, f"attention heads do not line up at {node.name}")
        ctx.tag(q, rq - 3, Tag.HEADS)
    ctx.tie(q, rq - 1, k, rk - 1)
    ctx.contraction(q, rq - 1, [q, k], f"attention q.k at {node.name}")
    ctx.tag(q, rq - 1, Tag.HEAD_DIM)
    ctx.tag(v, rk - 1, Tag.HEAD_DIM)
    ctx.tie(k, rk - 2, v, rk - 2)
    ctx.inexact(k, rk - 2, f"softmax over keys at {node.name}")
    ctx.tie(q, rq - 2, out, rq - 2)
    ctx.tie(v, rk - 1, out, rq - 1)
    if mask is not None:
        rm = ctx.rank(mask)
        for kk in range(1, rm + 1):
            if is_one(ctx.shape(mask)[rm - kk]):
                continue
            if kk == 1:
                ctx.tie(mask, rm - 1, k, rk - 2)
            elif kk <= rq:
                ctx.tie(mask, rm - kk, q, rq - kk)
    ctx.zero_contract(out, [v])
    for extra in outs[1:]:
        ctx.zero_never(extra)
        ctx.freeze_ref(extra, f"attention statistics at {node.name}")


# ------------------------------------------------------------------------------------------
# Normalisations
# ------------------------------------------------------------------------------------------
@register_rule(aten._weight_norm, aten._weight_norm_interface)
def weight_norm_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """w = g * v / ||v|| with the norm over every dim but ``dim``: a norm over those dims (inexact),
    and never zero (a zeroed slice of v gives 0/0)."""
    v, g = ctx.ref(node.args[0]), ctx.ref(node.args[1])
    rank = ctx.rank(v)
    dim = norm_dim(arg(node, 2, "dim", 0), rank)
    outs = ctx.output_refs(node)
    ctx.broadcast(outs[0], [v, g])
    for i in range(rank):
        if i != dim:
            ctx.inexact(v, i, f"weight norm over this dim at {node.name}")
    for out in outs[1:]:
        ctx.broadcast(out, [g])
    for out in outs:
        ctx.zero_never(out)

def _affine_norm(ctx: AnalysisContext, node: fx.Node, out: TRef, x: TRef, w: TRef | None, b: TRef | None,
                 norm_dims: Sequence[int], shape_arg: int | None) -> None:
    ctx.tie_all(out, x)
    k = len(norm_dims)
    for j, d in enumerate(norm_dims):
        for p in (w, b):
            if p is not None:
                ctx.tie(p, ctx.rank(p) - k + j, x, d)
        ctx.inexact(x, d, f"normalisation over this dim at {node.name}")
        ctx.tag(x, d, Tag.NORMALIZED)
        if shape_arg is not None:
            ctx.size_arg(node, ArgPath("args", shape_arg, j), x, d)
    if w is not None:
        ctx.zero_contract(out, [w], [b] if b is not None else [])
    else:
        ctx.zero_never(out)


@register_rule(aten.layer_norm, aten.rms_norm)
def layer_norm_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    x = ctx.ref(node.args[0])
    shape = list(node.args[1])
    w = ctx.ref(arg(node, 2, "weight"))
    b = ctx.ref(arg(node, 3, "bias")) if node.target.overloadpacket is aten.layer_norm else None
    rank = ctx.rank(x)
    _affine_norm(ctx, node, ctx.out(node), x, w, b, list(range(rank - len(shape), rank)), 1)


@register_rule(aten.native_layer_norm, aten._fused_rms_norm)
def native_layer_norm_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    x = ctx.ref(node.args[0])
    shape = list(node.args[1])
    w = ctx.ref(arg(node, 2, "weight"))
    b = ctx.ref(arg(node, 3, "bias")) if node.target.overloadpacket is aten.native_layer_norm else None
    rank = ctx.rank(x)
    outs = ctx.output_refs(node)
    _affine_norm(ctx, node, outs[0], x, w, b, list(range(rank - len(shape), rank)), 1)
    for stat in outs[1:]:
        for i in range(ctx.rank(stat)):
            if not is_one(ctx.shape(stat)[i]) and i < rank:
                ctx.tie(stat, i, x, i)
        ctx.zero_never(stat)


@register_rule(aten.group_norm, aten.native_group_norm)
def group_norm_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    x = ctx.ref(node.args[0])
    native = node.target.overloadpacket is aten.native_group_norm
    if native:
        w, b = ctx.ref(node.args[1]), ctx.ref(node.args[2])
        groups = int(node.args[6])
    else:
        groups = int(node.args[1])
        w, b = ctx.ref(arg(node, 2, "weight")), ctx.ref(arg(node, 3, "bias"))
    outs = ctx.output_refs(node)
    out = outs[0]
    ctx.tie_all(out, x)
    c = ctx.shape(x)[1]
    st = ctx.store
    g_atom = st.new(groups) if groups > 1 else None
    per = [st.new(c // groups)] if c // groups > 1 else []
    st.unify_prod(ctx.d(x)[1], ([g_atom] if g_atom is not None else []) + per)
    st.mark_inexact(per, f"group norm within a group at {node.name}")
    st.tag(per, Tag.NORMALIZED)
    for p in (w, b):
        if p is not None:
            ctx.tie(p, 0, x, 1)
    if native:
        ctx.size_arg(node, ArgPath("args", 4), x, 1)
        if g_atom is not None:
            ctx.size_arg_atoms(node, ArgPath("args", 6), [g_atom])
        for stat in outs[1:]:
            ctx.tie(stat, 0, x, 0)
            if g_atom is not None:
                st.unify_prod(ctx.d(stat)[1], [g_atom])
            ctx.zero_never(stat)
    elif g_atom is not None:
        ctx.size_arg_atoms(node, ArgPath("args", 1), [g_atom])
    if w is not None:
        ctx.zero_contract(out, [w], [b] if b is not None else [])
    else:
        ctx.zero_never(out)


@register_rule(aten.batch_norm, aten.native_batch_norm, aten._native_batch_norm_legit_no_training,
               aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit,
               aten.instance_norm)
def batch_norm_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    x = ctx.ref(node.args[0])
    params = [ctx.ref(a) for a in node.args[1:5]]
    outs = ctx.output_refs(node)
    out = outs[0]
    ctx.tie_all(out, x)
    for p in params:
        if p is not None and ctx.rank(p) == 1:
            ctx.tie(p, 0, x, 1)
    if node.target.overloadpacket is aten.instance_norm:
        for i in range(2, ctx.rank(x)):
            ctx.inexact(x, i, "instance norm")
    for extra in outs[1:]:
        if ctx.rank(extra) == 1 and ctx.shape(extra)[0] == ctx.shape(x)[1]:
            ctx.tie(extra, 0, x, 1)
        ctx.zero_never(extra)
    w, b = params[0], params[1]
    if w is not None:
        ctx.zero_contract(out, [w], [b] if b is not None else [])
    else:
        ctx.zero_never(out)


# ------------------------------------------------------------------------------------------
# Embedding and indexing
# ------------------------------------------------------------------------------------------
@register_rule(aten.embedding)
def embedding_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    w, ids = ctx.ref(node.args[0]), ctx.ref(node.args[1])
    out = ctx.out(node)
    ro, ri = ctx.rank(out), ctx.rank(ids)
    ctx.tie(out, ro - 1, w, 1)
    for i in range(ri):
        ctx.tie(out, i, ids, i)
    ctx.freeze_dim(w, 0, f"embedding rows are indexed by token ids at {node.name}")
    ctx.tag(w, 1, Tag.EMBEDDING_DIM)
    ctx.zero_contract(out, [w])


@register_rule(aten.index)
def index_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    indices = list(node.args[1])
    rank = ctx.rank(src)
    used = [i for i, t in enumerate(indices) if t is not None]
    idx_refs = [ctx.ref(indices[i]) for i in used]
    for i, r in zip(used, idx_refs):
        if not _follow_values(ctx, node, r, src, i):  # routing: param[expert_ids] (see below)
            ctx.freeze_dim(src, i, f"indexed by values at {node.name}")
    contiguous = used == list(range(used[0], used[-1] + 1)) if used else True
    bshape_rank = max((ctx.rank(r) for r in idx_refs if r is not None), default=0)
    if not contiguous:
        ctx.freeze_ref(out, f"non-contiguous advanced indexing at {node.name}")
        ctx.zero_never(out)
        return
    first = used[0] if used else 0
    # leading untouched dims
    for i in range(first):
        ctx.tie(src, i, out, i)
    for r in idx_refs:
        if r is None:
            continue
        rr = ctx.rank(r)
        for k in range(1, rr + 1):
            if not is_one(ctx.shape(r)[rr - k]):
                ctx.tie(r, rr - k, out, first + bshape_rank - k)
    trailing = list(range(used[-1] + 1, rank)) if used else []
    for j, i in enumerate(trailing):
        ctx.tie(src, i, out, first + bshape_rank + j)
    ctx.zero_pass(out, [src])


@register_rule(aten.index_select)
def index_select_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    dim = norm_dim(node.args[1], ctx.rank(src))
    idx = ctx.ref(node.args[2])
    for i in range(ctx.rank(src)):
        if i == dim:
            if not _follow_values(ctx, node, idx, src, i):
                ctx.freeze_dim(src, i, f"indexed by values at {node.name}")
            if idx is not None and ctx.rank(idx) == 1:
                ctx.tie(idx, 0, out, i)
        else:
            ctx.tie(src, i, out, i)
    ctx.zero_pass(out, [src])


@register_rule(aten.gather)
def gather_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    dim = norm_dim(node.args[1], ctx.rank(src))
    idx = ctx.ref(node.args[2])
    ctx.tie_all(out, idx)
    if not _follow_values(ctx, node, idx, src, dim):  # scores.gather(1, topk_indices)
        ctx.freeze_dim(src, dim, f"gathered by values at {node.name}")
    for i in range(ctx.rank(src)):
        if i != dim and ctx.shape(src)[i] == ctx.shape(idx)[i]:
            ctx.tie(src, i, out, i)
        elif i != dim:
            ctx.freeze_dim(src, i, f"partial gather at {node.name}")
    ctx.zero_pass(out, [src])


@register_rule(aten.index_add, aten.index_copy, aten.index_add_, aten.index_copy_)
def index_add_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    dim = norm_dim(node.args[1], ctx.rank(src))
    values = ctx.ref(node.args[3])
    ctx.tie_all(out, src)
    if not _follow_values(ctx, node, ctx.ref(node.args[2]), src, dim):
        ctx.freeze_dim(src, dim, f"written at index values at {node.name}")
    for i in range(ctx.rank(src)):
        if i != dim:
            ctx.tie(values, i, src, i)
    ctx.zero_pass(out, [src, values])


@register_rule(aten.index_put, aten.index_put_)
def index_put_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    indices = list(node.args[1])
    values = ctx.ref(node.args[2])
    ctx.tie_all(out, src)
    used = [i for i, t in enumerate(indices) if t is not None]
    for i in used:
        if not _follow_values(ctx, node, ctx.ref(indices[i]), src, i):
            ctx.freeze_dim(src, i, f"written at index values at {node.name}")
    trailing = [i for i in range(ctx.rank(src)) if i > (used[-1] if used else -1)]
    rv = ctx.rank(values)
    for k, i in enumerate(reversed(trailing)):
        if k < rv and not is_one(ctx.shape(values)[rv - 1 - k]):
            ctx.tie(values, rv - 1 - k, src, i)
    ctx.zero_pass(out, [src, values])


@register_rule(aten.one_hot)
def one_hot_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """one_hot(ids, C): the class dim is the space the ids' values index (C = E, or E + 1 with a
    sentinel class for dropped tokens); otherwise it is frozen."""
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    for i in range(ctx.rank(src)):
        ctx.tie(src, i, out, i)
    last = ctx.rank(out) - 1
    atoms = ctx.values_of(src)
    classes = int_size(ctx, out, last)
    size = _atoms_size(ctx, atoms)
    path = ArgPath("args", 1) if len(node.args) > 1 else ArgPath("kwargs", "num_classes")
    if atoms and size is not None and classes in (size, size + 1):
        space = ctx.store.make("prod", atoms)
        if classes == size + 1:
            sentinel = ctx.store.new(1, frozen=f"sentinel one-hot class at {node.name}")
            space = ctx.store.make("sum", [space, sentinel])
        ctx.store.unify_prod(ctx.d(out)[last], [space])
        ctx.size_arg(node, path, out, last)
        ctx.use_values(node, src)
    else:
        ctx.freeze_dim(out, last, f"one-hot classes at {node.name}")
    ctx.zero_never(out)


# ------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------
def _reduce(ctx: AnalysisContext, node: fx.Node, src: TRef, dims: Sequence[int] | None, keepdim: bool,
            mode: str) -> None:
    """mode: 'sum' (exact on zeroed input), 'inexact' (mean, var, max...), 'index' (argmax)."""
    rank = ctx.rank(src)
    dims = list(range(rank)) if dims is None or len(dims) == 0 else [norm_dim(d, rank) for d in dims]
    outs = ctx.output_refs(node)
    for out in outs:
        j = 0
        for i in range(rank):
            if i in dims:
                if keepdim:
                    j += 1
                continue
            if j < ctx.rank(out):
                ctx.tie(src, i, out, j)
            j += 1
    site = rms_site(node) if mode == "mean" and len(dims) == 1 and keepdim else None
    for d in dims:
        if mode == "sum":
            ctx.contraction(src, d, [src], f"sum at {node.name}")
        elif site is not None:  # RMS norm: exact once its weight and eps are rescaled (NormScale)
            ctx.contraction(src, d, [src], f"mean at {node.name}")
            ctx.norm_scale(site, src, d)
            if d == rank - 1:
                ctx.tag(src, d, Tag.NORMALIZED)
        elif mode == "index":
            ctx.freeze_dim(src, d, f"{node.target} returns positions along this dim at {node.name}")
        else:
            ctx.inexact(src, d, f"{node.target.overloadpacket.__name__} over this dim at {node.name}")
            if mode == "mean" and d == rank - 1:
                ctx.tag(src, d, Tag.NORMALIZED)
    for k, out in enumerate(outs):
        if mode in ("sum", "mean") or (mode == "inexact" and k == 0 and "max" in str(node.target)):
            ctx.zero_pass(out, [src])
        else:
            ctx.zero_never(out)


_CASTS = frozenset({aten.to, aten._to_copy, aten.type_as, aten.alias, aten.clone, aten.contiguous})


def compute_users(node: fx.Node) -> list[fx.Node]:
    """``node``'s users that compute something (metadata asserts aside)."""
    return [u for u in node.users if not is_metadata_only(u)]


def op_packet(node: Any) -> Any:
    return getattr(node.target, "overloadpacket", None) if isinstance(node, fx.Node) else None


def through_casts(node: fx.Node, forward: bool) -> fx.Node:
    """Follow a chain of dtype casts/copies: forward along sole users, or back to their source."""
    for _ in range(8):
        if forward:
            users = compute_users(node)
            if len(users) != 1 or op_packet(users[0]) not in _CASTS:
                return node
            node = users[0]
        else:
            if op_packet(node) not in _CASTS or not isinstance(node.args[0], fx.Node) or len(compute_users(node)) != 1:
                return node
            node = node.args[0]
    return node


def other_operand(node: fx.Node, one: fx.Node) -> Any:
    """The other operand of a binary ``node`` one of whose operands is ``one`` (None otherwise)."""
    a, b = (list(node.args) + [None, None])[:2]
    return b if a is one else a if b is one else None


def rms_site(mean: fx.Node) -> NormScale | None:
    """The RMS norm ``mean`` opens, when its output reaches nothing but a weight multiply:
    ``x * rsqrt(mean(x * x | x ** 2) + eps)``, cast, times ``weight`` or ``weight + c`` (Gemma).
    Anything else (another use of the statistic or of the unweighted output, a weightless norm)
    returns None, and the mean stays inexact."""
    sq = mean.args[0]
    if op_packet(sq) is aten.pow and len(sq.args) == 2 and sq.args[1] == 2:
        x = sq.args[0]
    elif op_packet(sq) is aten.mul and len(sq.args) == 2 and sq.args[0] is sq.args[1]:
        x = sq.args[0]
    else:
        return None
    users = compute_users(mean)
    if len(compute_users(sq)) != 1 or len(users) != 1 or users[0].target is not aten.add.Tensor or users[0].kwargs:
        return None
    add = users[0]
    eps = other_operand(add, mean)
    if not isinstance(eps, float) or len(compute_users(add)) != 1:
        return None
    rs = compute_users(add)[0]
    if op_packet(rs) is not aten.rsqrt or len(compute_users(rs)) != 1:
        return None
    normed = compute_users(rs)[0]
    if op_packet(normed) is not aten.mul or other_operand(normed, rs) is not x:
        return None
    end = through_casts(normed, forward=True)
    users = compute_users(end)
    if len(users) != 1 or op_packet(users[0]) is not aten.mul:
        return None
    w = other_operand(users[0], end)
    if not isinstance(w, fx.Node):
        return None
    w, offset = through_casts(w, forward=False), 0.0
    if w.target is aten.add.Tensor and not w.kwargs and len(compute_users(w)) == 1:
        for a, b in (w.args, w.args[::-1]):
            if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
                w, offset = through_casts(a, forward=False), float(b)
                break
    if w.op != "placeholder" or len(compute_users(w)) != 1:
        return None
    return NormScale(w.name, offset, add.name, ArgPath("args", add.args.index(eps)), eps)


_REDUCTIONS = {
    aten.sum: "sum", aten.nansum: "sum", aten.mean: "mean", aten.nanmean: "mean", aten.var: "mean", aten.std: "mean",
    aten.var_mean: "mean", aten.std_mean: "mean", aten.amax: "inexact", aten.amin: "inexact",
    aten.logsumexp: "inexact", aten.norm: "inexact", aten.linalg_vector_norm: "inexact",
    aten.prod: "inexact", aten.any: "inexact", aten.all: "inexact", aten.max: "inexact",
    aten.min: "inexact", aten.argmax: "index", aten.argmin: "index",
}


@register_rule(*_REDUCTIONS)
def reduction_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    packet = node.target.overloadpacket
    mode = _REDUCTIONS[packet]
    src = ctx.ref(node.args[0])
    schema_args = node.target._schema.arguments
    names = [a.name for a in schema_args]
    dims = None
    keepdim = False
    for i, name in enumerate(names):
        val = node.args[i] if i < len(node.args) else node.kwargs.get(name)
        if name == "dim" and val is not None:
            dims = [val] if isinstance(val, int) else list(val)
        if name == "keepdim" and val is not None:
            keepdim = bool(val)
    if packet in (aten.max, aten.min) and dims is not None and len(ctx.output_refs(node)) == 2:
        _reduce(ctx, node, src, dims, keepdim, "inexact")
        rank = ctx.rank(src)
        ctx.freeze_dim(src, norm_dim(dims[0], rank), f"max/min indices along this dim at {node.name}")
        return
    if packet in (aten.norm, aten.linalg_vector_norm) and dims is None and "dim" not in names:
        dims = None
    _reduce(ctx, node, src, dims, keepdim, mode)
    if packet in (aten.var, aten.std, aten.var_mean, aten.std_mean):
        rank = ctx.rank(src)
        for d in (dims or range(rank)):
            ctx.tag(src, norm_dim(d, rank), Tag.NORMALIZED)


@register_rule(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax)
def softmax_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    dim = norm_dim(node.args[1], ctx.rank(src))
    ctx.tie_all(out, src)
    ctx.inexact(src, dim, f"softmax over this dim at {node.name}")
    ctx.zero_never(out)


@register_rule(aten.diff)
def diff_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    dim = norm_dim(arg(node, 2, "dim", -1), ctx.rank(src))
    for i in range(ctx.rank(src)):
        if i == dim:
            ctx.freeze_dim(src, i, f"diff along this dim at {node.name}")
            ctx.freeze_dim(out, i, f"diff along this dim at {node.name}")
        else:
            ctx.tie(src, i, out, i)
    ctx.zero_never(out)


@register_rule(aten.cumsum, aten.cumprod, aten.cummax, aten.cummin, aten.logcumsumexp)
def cumulative_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src = ctx.ref(node.args[0])
    dim = norm_dim(node.args[1], ctx.rank(src))
    for out in ctx.output_refs(node):
        ctx.tie_all(out, src)
        ctx.zero_never(out)
    if node.target.overloadpacket is aten.cumsum:
        ctx.contraction(src, dim, [src], f"cumsum at {node.name}")
    else:
        ctx.inexact(src, dim, f"cumulative op at {node.name}")


@register_rule(aten.topk, aten.sort, aten.argsort, aten.kthvalue)
def topk_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """Selection along a dim.  ``topk`` of a float tensor is a router: its indices are a *value
    space* of the selected dim (the experts), which stays prunable as long as every consumer of
    the indices is followed (``param[ids]``, ``one_hot``, ``gather``, ``histc``...); removing a
    unit re-routes the tokens that chose it, so the space is marked inexact.  ``sort`` of such
    indices keeps their values.  Anything else freezes the selected dim, as positions."""
    src = ctx.ref(node.args[0])
    rank = ctx.rank(src)
    schema = [a.name for a in node.target._schema.arguments]
    dim = -1
    if "dim" in schema:
        i = schema.index("dim")
        dim = node.args[i] if i < len(node.args) else node.kwargs.get("dim", -1)
    dim = norm_dim(dim, rank)
    packet = node.target.overloadpacket
    outs = ctx.output_refs(node)
    src_val = ctx.val(src)
    routed = (packet is aten.topk and len(outs) == 2 and src_val is not None and src_val.is_floating_point()
              and int_size(ctx, src, dim) is not None and ctx.d(src)[dim])
    carried = ctx.values_of(src) if packet is aten.sort else None
    if routed:
        ctx.inexact(src, dim, f"top-k routing at {node.name}: removing a unit re-routes the tokens that chose it "
                              "(equal to the original with its router logit masked)")
        ctx.tag(src, dim, Tag.EXPERTS)
        ctx.set_values(outs[1], ctx.d(src)[dim], node.name)
        ctx.routing.append(("topk", (node.name, dim, int(arg(node, 1, "k")))))
    elif carried is not None:
        ctx.use_values(node, src)
        ctx.set_values(outs[0], carried, node.name)
    else:
        ctx.freeze_dim(src, dim, f"{packet.__name__} picks positions along this dim at {node.name}")
    for out in outs:
        for i in range(rank):
            if i != dim:
                ctx.tie(src, i, out, i)
            else:
                ctx.freeze_dim(out, i, f"selected positions at {node.name}")
        ctx.zero_never(out)


# ------------------------------------------------------------------------------------------
# Sources and spatial ops
# ------------------------------------------------------------------------------------------
_SIZED_SOURCES = {  # factories whose values do not depend on the position: packet -> size arg
    aten.zeros: 0, aten.ones: 0, aten.full: 0, aten.empty: 0,
    aten.new_zeros: 1, aten.new_ones: 1, aten.new_full: 1, aten.new_empty: 1,
}


@register_rule(aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.new_zeros, aten.new_ones,
               aten.new_full, aten.new_empty, aten.scalar_tensor, aten.rand, aten.randn, aten.linspace,
               aten.eye, aten.empty_strided, aten.new_empty_strided, aten.randint)
def source_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """A factory: fresh spaces.  Constant-valued ones get their size list recomputed; the rest
    (``arange`` feeding RoPE) are index-selected along pruned dims by the rewrite."""
    for out in ctx.output_refs(node):
        ctx.fresh(out)
        ctx.zero_never(out)
    pos = _SIZED_SOURCES.get(node.target.overloadpacket)
    sizes = node.args[pos] if pos is not None and len(node.args) > pos else None
    if isinstance(sizes, (list, tuple)):
        ctx.shape_args(node, ArgPath("args", pos), sizes, ctx.out(node))
    else:
        ctx.sources.add(node.name)


_SPATIAL_OPS = [
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "lp_pool1d", "lp_pool2d", "lp_pool3d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
    "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
]


def _spatial_rank(op: Any) -> int:
    """How many trailing dims a pooling/upsampling op treats as positions: its name says (1d/2d/3d)."""
    name = op.overloadpacket.__name__
    for k in (1, 2, 3):
        if f"{k}d" in name:
            return k
    return 2


@register_rule(*(getattr(aten, n) for n in _SPATIAL_OPS if hasattr(aten, n)))
def spatial_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """Pooling/upsampling: the trailing 1/2/3 dims (per the op) are positions, the rest (batch,
    channels) pass through.  A 1-D pool of (N, C, L) freezes only L."""
    src = ctx.ref(node.args[0])
    rank = ctx.rank(src)
    k = min(_spatial_rank(node.target), rank)
    for i in range(rank - k, rank):
        ctx.freeze_dim(src, i, f"spatial position at {node.name}")
    for n, out in enumerate(ctx.output_refs(node)):
        ro = ctx.rank(out)
        for i in range(min(rank, ro) - k):
            ctx.tie(src, i, out, i)
        for i in range(max(ro - k, 0), ro):
            ctx.freeze_dim(out, i, f"spatial position at {node.name}")
        if n == 0:
            ctx.zero_pass(out, [src])
        else:
            ctx.zero_never(out)


@register_rule(aten.item, aten._local_scalar_dense)
def scalar_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    src = ctx.ref(node.args[0])
    ctx.freeze_ref(src, f"value read into Python at {node.name}")


# ------------------------------------------------------------------------------------------
# Routing: value spaces (MoE expert indices) through topk, one_hot, gather, scatter, histc...
# ------------------------------------------------------------------------------------------
def _atoms_size(ctx: AnalysisContext, atoms: Sequence[int] | None) -> int | None:
    """Number of positions a value space spans (None when symbolic or absent)."""
    if not atoms:
        return None
    n = 1
    for a in atoms:
        s = ctx.store.size[ctx.store.find(a)]
        if not isinstance(s, int):
            return None
        n *= s
    return n


def _routed(ctx: AnalysisContext, ref: TRef, dim: int) -> bool:
    """Whether (ref, dim) is a space a top-k router picks among (tagged by ``topk_rule``)."""
    return any(Tag.EXPERTS in ctx.store.all_tags(a) for a in ctx.d(ref)[dim])


def _follow_values(ctx: AnalysisContext, node: fx.Node, idx: TRef | None, src: TRef, dim: int) -> bool:
    """``node`` indexes dim ``dim`` of ``src`` with the values of ``idx``: when those values are
    positions of a known space (the experts), that space *is* the indexed dim.  True when tied."""
    atoms = ctx.values_of(idx)
    size = _atoms_size(ctx, atoms)
    if atoms is None or size is None or int_size(ctx, src, dim) != size:
        return False
    ctx.store.unify_prod(ctx.d(src)[dim], list(atoms))
    ctx.use_values(node, idx)
    ctx.routing.append(("indexed", (node.name, src.node, dim, idx)))
    return True


@register_rule(aten.scatter, aten.scatter_add, aten.scatter_reduce, aten.scatter_, aten.scatter_add_, aten.scatter_reduce_)
def scatter_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """scatter(self, dim, index, src|value): writes along ``dim`` at the index values (expert
    counts ``zeros(E).scatter_add_(0, ids, ones)``, DeepSeek's group masks)."""
    dst, out = ctx.ref(node.args[0]), ctx.out(node)
    rank = ctx.rank(dst)
    dim = norm_dim(node.args[1], rank)
    idx = ctx.ref(node.args[2])
    src = ctx.ref(node.args[3]) if len(node.args) > 3 else None
    ctx.tie_all(out, dst)
    if idx is not None:
        if src is not None:
            ctx.tie_all(src, idx)
        for i in range(min(rank, ctx.rank(idx))):
            if i == dim:
                continue
            if ctx.shape(idx)[i] == ctx.shape(dst)[i]:
                ctx.tie(idx, i, dst, i)
            else:
                ctx.freeze_dim(dst, i, f"partial scatter at {node.name}")
    if not _follow_values(ctx, node, idx, dst, dim):
        ctx.freeze_dim(dst, dim, f"written at index values at {node.name}")
    if src is not None:
        ctx.zero_pass(out, [dst, src])
    elif len(node.args) > 3 and node.args[3] == 0:
        ctx.zero_pass(out, [dst])
    else:
        ctx.zero_never(out)


@register_rule(aten.histc)
def histc_rule(ctx: AnalysisContext, node: fx.Node) -> None:
    """histc(ids, bins=E, min=0, max=E-1) counts the rows routed to each expert: its bins are
    the expert space (``grouped_mm`` offsets); any other histogram's bins are frozen."""
    src, out = ctx.ref(node.args[0]), ctx.out(node)
    bins, lo, hi = arg(node, 1, "bins", 100), arg(node, 2, "min", 0), arg(node, 3, "max", 0)
    atoms = ctx.values_of(src)
    size = _atoms_size(ctx, atoms)
    if atoms and size == bins and lo == 0 and hi == size - 1 and ctx.d(out)[0]:
        ctx.store.unify_prod(ctx.d(out)[0], list(atoms))
        ctx.size_arg(node, ArgPath("args", 1) if len(node.args) > 1 else ArgPath("kwargs", "bins"), out, 0)
        ctx.value_arg(node, ArgPath("args", 3) if len(node.args) > 3 else ArgPath("kwargs", "max"), out, 0, -1)
        ctx.use_values(node, src)
    else:
        ctx.fresh(out)
        ctx.freeze_ref(out, f"histogram bins at {node.name}")
    ctx.zero_never(out)


# Ops whose output holds the values of their first input, rearranged (value spaces pass through)
_VALUE_KEEPING = {
    aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze,
    aten.clone, aten.contiguous, aten._to_copy, aten.to, aten.alias, aten.detach, aten.lift_fresh_copy,
    aten.permute, aten.transpose, aten.t, aten.expand, aten.slice, aten.select, aten.narrow, aten.repeat,
    aten.repeat_interleave, aten.index, aten.index_select, aten.split, aten.split_with_sizes, aten.chunk,
    aten.unbind, aten._assert_tensor_metadata, aten.view_as, aten.reshape_as, aten.expand_as,
}


def propagate_values(ctx: AnalysisContext, node: fx.Node) -> None:
    """After ``node``'s rule: carry value spaces through layout ops, freeze them anywhere else.

    A value space stays prunable only while fxprune knows every use of the values: a rule that
    follows them (``param[ids]``, ``one_hot``, ``histc``) says so with ``ctx.use_values``; a
    layout op passes them on; any other use (arithmetic on expert ids, a comparison with a
    constant) freezes the space they index, with the op named.
    """
    if node.op != "call_function" or not ctx.values:
        return
    carriers = [r for r in (ctx.ref(a) for a in flat_args(node)) if r is not None and r in ctx.values]
    if not carriers:
        return
    used = ctx.values_used.get(node.name, set())
    packet = getattr(node.target, "overloadpacket", None)
    first = ctx.ref(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    for ref in carriers:
        if ref in used:
            continue
        if ref == first and (packet in _VALUE_KEEPING or node.target is operator.getitem):
            atoms, origin = ctx.values[ref]
            for out in ctx.output_refs(node):
                ctx.values.setdefault(out, (atoms, origin))
            continue
        atoms, origin = ctx.values[ref]
        ctx.store.freeze(atoms, f"the indices {origin} returns are used by {node.target} at {node.name} "
                                f"({source_location(node)}), which fxprune does not follow")


# ------------------------------------------------------------------------------------------
# Zero probes for pointwise ops
# ------------------------------------------------------------------------------------------
_PROBE_CACHE: dict[tuple, bool] = {}


def probe_zero(node: fx.Node, pattern: tuple[bool, ...]) -> bool:
    """Whether a pointwise op maps zeros (where ``pattern`` says) to zero, for any other values.

    Runs the op on tiny CPU tensors, zeros in the flagged inputs and random non-zero values
    elsewhere, several times.  Conservative: any failure means "not zero".
    """
    key = (node.target, pattern, _const_signature(node))
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    ok = True
    gen = torch.Generator().manual_seed(0)
    try:
        for trial in range(3):
            k = iter(pattern)

            def make(a: Any) -> Any:
                if isinstance(a, fx.Node):
                    val = a.meta.get("val")
                    if not isinstance(val, torch.Tensor):
                        return _concrete_scalar(val)
                    is_zero = next(k)
                    return _probe_tensor(val.dtype, is_zero, gen, trial)
                if isinstance(a, (list, tuple)):
                    return type(a)(make(x) for x in a)
                return a

            args = tuple(make(a) for a in node.args)
            kwargs = {n: make(v) for n, v in node.kwargs.items()}
            kwargs.pop("device", None)
            out = node.target(*args, **kwargs)
            if not isinstance(out, torch.Tensor) or not bool((out == 0).all()):
                ok = False
                break
    except Exception:  # noqa: BLE001 - unknown behaviour is treated as "not zero"
        ok = False
    _PROBE_CACHE[key] = ok
    return ok


def _const_signature(node: fx.Node) -> str:
    parts = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            parts.append(f"T{getattr(val, 'dtype', type(val).__name__)}")
        else:
            parts.append(repr(a))
    return "|".join(parts)


def _concrete_scalar(val: Any) -> Any:
    try:
        return int(val)
    except Exception:  # noqa: BLE001
        return 2


def _probe_tensor(dtype: torch.dtype, zero: bool, gen: torch.Generator, trial: int) -> torch.Tensor:
    if zero:
        return torch.zeros(4, dtype=dtype)
    if dtype == torch.bool:
        return torch.tensor([True, False, True, True]) if trial % 2 else torch.ones(4, dtype=torch.bool)
    if dtype.is_floating_point or dtype.is_complex:
        vals = (torch.rand(4, generator=gen) * 4 - 2) * (10 ** trial)
        vals = torch.where(vals.abs() < 1e-3, torch.full_like(vals, 0.5), vals)
        return vals.to(dtype)
    return torch.randint(1, 7, (4,), generator=gen).to(dtype)


# Ops through which a parameter is still "a weight" (for telling attention, an activation x
# activation product, from a linear map): layout changes and row gathers (MoE expert weights).
_LAYOUT_PACKETS = {
    aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand,
    aten._to_copy, aten.alias, aten.clone, aten.contiguous, aten.unsqueeze, aten.squeeze, aten.to,
    aten.detach, aten.slice, aten.index, aten.index_select, aten.select, aten.split,
    aten.split_with_sizes, aten.chunk, aten.unbind, aten.embedding, aten.numpy_T, aten.mT,
    aten.swapaxes, aten.movedim, aten.broadcast_to, aten.expand_as, aten.view_as, aten.reshape_as,
    aten.flatten, aten.unflatten, aten.narrow,
}
