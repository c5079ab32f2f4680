"""Fuzzing campaign: random architectures, pruned at random, checked against zeroing.

    python bench/fuzz.py --n 5000 --seed 0                 # the campaign (resumable, in chunks)
    python bench/fuzz.py --n 200 --seed 7 --max-blocks 3   # the CI slice (tests/test_fuzz.py)
    python bench/fuzz.py --replay spec.json                # rerun one (minimised) model

**What is generated.**  A small grammar of blocks builds 1-D sequence models (``x: [B, S, D]``,
from token ids or float features) and 2-D image models (``x: [B, C, H, W]``).  Blocks: linear
layers and gated MLPs; every norm (LayerNorm, RMSNorm, BatchNorm with random running statistics so
that zeroing matters, GroupNorm, InstanceNorm, LocalResponseNorm, L2 normalize); hand-written
attention (matmul, bmm or einsum; scale from ``q.shape[-1]``, a constant or none; GQA repeats by
``repeat_interleave`` or ``expand``; RoPE; causal ``where`` masks) and SDPA attention (default or
explicit scale, ``enable_gqa``); every kind of convolution (plain, grouped, depthwise, dilated,
strided, transposed); reshape / permute / flatten / unflatten channel shuffles; cat / split /
chunk / narrow / slicing branches; gather / index_select; expand; residual and gated branches
(squeeze-excite); pooling; pixel (un)shuffle; einsum; pad; where.  A block spec holds only its own
choices; input sizes are read while building, so deleting a block keeps the rest buildable (the
minimiser relies on it).

**What is checked.**  Each model is traced, analysed and pruned at random: a random subset of its
exact groups loses a random subset of units (some models go through ``fxprune.prune`` with the
``random`` criterion instead).  The pruned model (whatever ``rewrite`` returned: the user's class
or the graph) must then equal the original with those units zeroed, at two batch sizes (and two
sequence lengths for sequence models), by this script's own comparison: relative to each output's
scale, judged again in float64 where float32 is ambiguous.  A model fxprune reported as verified
that differs in float64 is **silently wrong**.

**Outcomes.** ``ok`` / ``ok-graph`` (equal; the module or the graph was returned), ``ok-inexact``
(the plan had inexact groups, which need not equal zeroing: the model only has to run at every
shape with the right output shapes), ``no-groups``,
``capture-error`` / ``fxprune-error:<Type>`` (a clear fxprune error), ``verify-refused`` (fxprune's
own check refused its result: safe, but a missed analysis case), ``crash:<Type>`` (an exception
that is not an fxprune error), ``silently-wrong``, ``broken-at-other-shape`` (the returned model
fails at a shape the original takes), ``invalid`` (the generated model itself does not run; not
counted), ``timeout``.  Every failing model is shrunk by a minimiser (delete blocks, shrink
sizes) to a small model with the same outcome; its spec is stored for ``--replay``.

Results go to ``bench/results/fuzz.json`` (counts per outcome, the minimised failures) and one file
per chunk under ``bench/results/fuzz/`` so an interrupted campaign resumes where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import time
import traceback
import warnings
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class InvalidSpec(Exception):
    """The spec cannot be built at these sizes (the generator or minimiser skips it)."""


# ============================================================================================
# Blocks.  Each is built from (spec, input shape) and reports its output shape.
# Sequence state: (D,) for x [B, S, D];  image state: (C, H, W) for x [B, C, H, W].
# ============================================================================================
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x, "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
    "leaky": lambda x: torch.where(x > 0, x, 0.1 * x),
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _randomize_bn(m: nn.Module, gen: torch.Generator) -> None:
    """BatchNorm with non-trivial running statistics, so a zeroed channel still contributes."""
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
        if m.weight is not None:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen))


def _make_norm(kind: str, c: int, spatial: int, spec: dict, gen: torch.Generator, affine: bool) -> nn.Module:
    """Every norm over ``c`` channels of a 1-D (sequence) or 2-D (image) model."""
    if kind == "layer":
        return nn.LayerNorm(c, elementwise_affine=affine)
    if kind == "rms":
        return nn.RMSNorm(c)
    if kind == "batch":
        norm = (nn.BatchNorm1d if spatial == 1 else nn.BatchNorm2d)(c)
        _randomize_bn(norm, gen)
        return norm
    if kind == "group":
        g = [x for x in _divisors(c) if x > 1] or [1]
        return nn.GroupNorm(g[spec.get("g", 0) % len(g)], c)
    if kind == "instance":
        return (nn.InstanceNorm1d if spatial == 1 else nn.InstanceNorm2d)(c, affine=True)
    if kind == "lrn":
        return nn.LocalResponseNorm(2)
    raise InvalidSpec(kind)


class Linear(nn.Module):
    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, spec["out"], bias=spec.get("bias", True))
        self.act = spec.get("act", "none")
        self.out_dim = spec["out"]

    def forward(self, x):
        return ACTS[self.act](self.fc(x))


class GatedMLP(nn.Module):
    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        h = spec["hidden"]
        self.gate, self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d)
        self.act = spec.get("act", "silu")
        self.out_dim = d

    def forward(self, x):
        return self.down(ACTS[self.act](self.gate(x)) * self.up(x))


class SeqNorm(nn.Module):
    """A norm over the feature dim of [B, S, D] (channel norms see [B, D, S])."""

    def __init__(self, spec: dict, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.kind = spec["norm"]
        self.out_dim = d
        self.norm = None if self.kind == "l2" else _make_norm(self.kind, d, 1, spec, gen, spec.get("affine", True))

    def forward(self, x):
        if self.kind in ("layer", "rms"):
            return self.norm(x)
        if self.kind == "l2":
            return F.normalize(x, dim=-1)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    s = x.shape[-2]
    c, si = cos[:s], sin[:s]
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * si


class Attention(nn.Module):
    """Multi-head attention over [B, S, D]: hand-written (matmul/bmm/einsum) or SDPA, with GQA."""

    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        h, kv, e = spec["heads"], spec["kv_heads"], spec["head_dim"]
        if h % kv:
            raise InvalidSpec("heads % kv_heads")
        if spec.get("rope") and e % 2:
            raise InvalidSpec("rope needs an even head_dim")
        self.h, self.kv, self.e, self.ev = h, kv, e, spec.get("v_head_dim", e)
        self.q = nn.Linear(d, h * e, bias=spec.get("bias", True))
        self.k = nn.Linear(d, kv * e, bias=spec.get("bias", True))
        self.v = nn.Linear(d, kv * self.ev, bias=spec.get("bias", True))
        self.o = nn.Linear(h * self.ev, d)
        self.impl, self.scale_kind = spec["impl"], spec.get("scale", "shape")
        self.repeat, self.causal, self.rope = spec.get("repeat", "interleave"), spec.get("causal", False), spec.get("rope", False)
        self.scale = e ** -0.5  # used when scale_kind == "const"
        self.out_dim = d
        if self.rope:
            pos = torch.arange(64, dtype=torch.float32)[:, None]
            inv = 1.0 / (10000 ** (torch.arange(0, e, 2, dtype=torch.float32) / e))
            ang = torch.cat([pos * inv, pos * inv], dim=-1)
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)
        if self.causal:
            self.register_buffer("tril", torch.ones(64, 64, dtype=torch.bool).tril(), persistent=False)

    def _heads(self, t, n, e):
        b, s, _ = t.shape
        return t.view(b, s, n, e).transpose(1, 2)

    def _repeat(self, t):
        r = self.h // self.kv
        if r == 1:
            return t
        if self.repeat == "interleave":
            return t.repeat_interleave(r, dim=1)
        b, n, s, e = t.shape
        return t[:, :, None].expand(b, n, r, s, e).reshape(b, n * r, s, e)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self._heads(self.q(x), self.h, self.e), self._heads(self.k(x), self.kv, self.e), self._heads(self.v(x), self.kv, self.ev)
        if self.rope:
            q, k = _rope(q, self.cos, self.sin), _rope(k, self.cos, self.sin)
        if self.impl == "sdpa" or self.impl == "sdpa_gqa":
            if self.impl == "sdpa":
                k, v = self._repeat(k), self._repeat(v)
            kwargs = {"scale": self.scale} if self.scale_kind == "const" else {}
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.impl == "sdpa_gqa", **kwargs)
        else:
            k, v = self._repeat(k), self._repeat(v)
            if self.impl == "einsum":
                att = torch.einsum("bhse,bhte->bhst", q, k)
            elif self.impl == "bmm":
                att = torch.bmm(q.reshape(b * self.h, s, self.e), k.reshape(b * self.h, s, self.e).transpose(1, 2)).view(b, self.h, s, s)
            else:
                att = q @ k.transpose(-2, -1)
            if self.scale_kind == "shape":
                att = att * q.shape[-1] ** -0.5
            elif self.scale_kind == "const":
                att = att * self.scale
            if self.causal:
                att = torch.where(self.tril[:s, :s], att, torch.full_like(att, float("-inf")))
            att = att.softmax(-1)
            y = torch.einsum("bhst,bhte->bhse", att, v) if self.impl == "einsum" else att @ v
        y = y.transpose(1, 2)
        y = y.flatten(2) if self.impl == "einsum" else y.reshape(b, s, self.h * self.ev)
        return self.o(y)


def _conv_options(spec: dict, c: int) -> tuple[int, int, int, int]:
    """(out channels, groups, dilation, stride) of a conv block's kind over ``c`` input channels."""
    kind, out = spec["conv"], spec["out"]
    groups = 1
    if kind == "grouped":
        common = [g for g in _divisors(math.gcd(c, out)) if g > 1]
        if not common:
            raise InvalidSpec("no common group count")
        groups = common[spec.get("g", 0) % len(common)]
    elif kind == "depthwise":
        groups, out = c, c * spec.get("mult", 1)
    return out, groups, 2 if kind == "dilated" else 1, 2 if kind == "strided" else 1


class SeqConv(nn.Module):
    """Conv1d / ConvTranspose1d over the sequence: plain, grouped, depthwise, dilated, strided."""

    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        kind, k = spec["conv"], spec.get("k", 3)
        out, groups, dil, stride = _conv_options(spec, d)
        pad = dil * (k - 1) // 2
        if kind == "transposed":
            self.conv = nn.ConvTranspose1d(d, out, k, stride=spec.get("stride", 1), padding=(k - 1) // 2,
                                           groups=math.gcd(spec.get("g", 1), math.gcd(d, out)))
        else:
            self.conv = nn.Conv1d(d, out, k, stride=stride, padding=pad, dilation=dil, groups=groups,
                                  bias=spec.get("bias", True))
        self.act = spec.get("act", "none")
        self.out_dim = out

    def forward(self, x):
        return ACTS[self.act](self.conv(x.transpose(1, 2))).transpose(1, 2)


class Shuffle(nn.Module):
    """unflatten D into (a, b), permute, flatten back: a channel permutation through views."""

    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        divs = [x for x in _divisors(d) if 1 < x < d]
        if not divs:
            raise InvalidSpec("prime D")
        self.a = divs[spec.get("a", 0) % len(divs)]
        self.style = spec.get("style", "view")
        self.out_dim = d

    def forward(self, x):
        b, s, d = x.shape
        if self.style == "view":
            return x.view(b, s, self.a, d // self.a).transpose(-1, -2).reshape(b, s, d)
        if self.style == "unflatten":
            return x.unflatten(-1, (self.a, d // self.a)).permute(0, 1, 3, 2).flatten(2)
        return x.reshape(b, s, self.a, d // self.a).permute(0, 2, 1, 3).contiguous().permute(0, 2, 3, 1).reshape(b, s, d)


class Branches(nn.Module):
    """Cut D into parts (split / chunk / narrow / slicing), a linear on each, cat the results."""

    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        if d < 2:
            raise InvalidSpec("D < 2")
        self.how = spec["how"]
        cut = max(1, min(d - 1, int(round(d * spec.get("frac", 0.5)))))
        if self.how == "chunk":
            n = spec.get("n", 2)
            if d % n:
                raise InvalidSpec("chunk")
            sizes = [d // n] * n
        elif self.how in ("narrow", "slice"):
            sizes = [cut, d - cut]
        else:
            sizes = [cut, d - cut]
        self.sizes = sizes
        outs = spec.get("outs", [4] * len(sizes))
        self.fcs = nn.ModuleList(nn.Linear(a, outs[i % len(outs)]) for i, a in enumerate(sizes))
        self.out_dim = sum(outs[i % len(outs)] for i in range(len(sizes)))

    def forward(self, x):
        if self.how == "split":
            parts = x.split(self.sizes, dim=-1)
        elif self.how == "chunk":
            parts = x.chunk(len(self.sizes), dim=-1)
        elif self.how == "narrow":
            parts = (x.narrow(-1, 0, self.sizes[0]), x.narrow(-1, self.sizes[0], self.sizes[1]))
        else:
            parts = (x[..., : self.sizes[0]], x[..., self.sizes[0]:])
        return torch.cat([fc(p) for fc, p in zip(self.fcs, parts, strict=True)], dim=-1)


class Select(nn.Module):
    """index_select / gather of a fixed subset (and order) of the features."""

    def __init__(self, spec: dict, d: int, gen: torch.Generator) -> None:
        super().__init__()
        n = max(1, min(d, spec.get("n", d)))
        idx = torch.randperm(d, generator=gen)[:n]
        self.register_buffer("idx", idx)
        self.how = spec.get("how", "index_select")
        self.out_dim = n

    def forward(self, x):
        if self.how == "gather":
            return torch.gather(x, -1, self.idx.expand(*x.shape[:-1], -1))
        return x.index_select(-1, self.idx)


class Expand(nn.Module):
    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        self.r = spec.get("r", 2)
        self.fc = nn.Linear(d * self.r, spec["out"])
        self.out_dim = spec["out"]

    def forward(self, x):
        b, s, d = x.shape
        return self.fc(x.unsqueeze(2).expand(b, s, self.r, d).reshape(b, s, self.r * d))


class SeqPool(nn.Module):
    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        self.kind, self.stride = spec.get("pool", "avg"), spec.get("stride", 1)
        self.out_dim = d

    def forward(self, x):
        t = x.transpose(1, 2)
        t = F.avg_pool1d(t, 2, self.stride) if self.kind == "avg" else F.max_pool1d(t, 2, self.stride)
        return t.transpose(1, 2)


class Einsum(nn.Module):
    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, spec["out"]) / math.sqrt(d))
        self.out_dim = spec["out"]

    def forward(self, x):
        return torch.einsum("bsd,de->bse", x, self.w)


class Pad(nn.Module):
    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        self.p, self.where = spec.get("p", 1), spec.get("where", "feature")
        self.out_dim = d + self.p if self.where == "feature" else d

    def forward(self, x):
        if self.where == "feature":
            return F.pad(x, (0, self.p))
        return F.pad(x, (0, 0, self.p, 0))


class Where(nn.Module):
    def __init__(self, spec: dict, d: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((d,), 0.25))
        self.out_dim = d

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * x)


class Residual(nn.Module):
    """x + body(x) (optionally pre-normed), with a D-preserving body."""

    def __init__(self, spec: dict, d: int, gen: torch.Generator, family: str, shape: tuple) -> None:
        super().__init__()
        body, cur = [], shape
        for sub in spec["body"]:
            blk = build_block(sub, cur, gen, family)
            body.append(blk)
            cur = blk.out_shape
        if cur != shape:  # project back
            blk = build_block({"kind": "linear", "out": shape[0]} if family == "seq" else
                              {"kind": "conv", "conv": "plain", "out": shape[0], "k": 1}, cur, gen, family)
            if blk.out_shape != shape:
                raise InvalidSpec("residual body changes the spatial/sequence shape")
            body.append(blk)
        self.body = nn.ModuleList(body)
        self.out_dim = d

    def forward(self, x):
        y = x
        for blk in self.body:
            y = blk(y)
        return x + y


class Gate(nn.Module):
    """x * sigmoid(g(x)): a learned gate (sequence) or squeeze-excite (image)."""

    def __init__(self, spec: dict, c: int, family: str) -> None:
        super().__init__()
        self.family = family
        r = max(1, spec.get("r", 2))
        self.fc1, self.fc2 = nn.Linear(c, r), nn.Linear(r, c)
        self.out_dim = c

    def forward(self, x):
        if self.family == "seq":
            return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x))))
        s = x.mean((2, 3))
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))[:, :, None, None]


# --------------------------------------------------------------------------------------------
# image blocks
# --------------------------------------------------------------------------------------------
class Conv2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        c, h, w = shape
        kind, k = spec["conv"], spec.get("k", 3)
        out, groups, dil, stride = _conv_options(spec, c)
        pad = dil * (k - 1) // 2
        if kind == "transposed":
            st = spec.get("stride", 1)
            self.conv = nn.ConvTranspose2d(c, out, k, stride=st, padding=(k - 1) // 2,
                                           output_padding=st - 1 if st > 1 else 0)
            nh, nw = (h - 1) * st - 2 * ((k - 1) // 2) + k + (st - 1 if st > 1 else 0), None
            nw = (w - 1) * st - 2 * ((k - 1) // 2) + k + (st - 1 if st > 1 else 0)
        else:
            self.conv = nn.Conv2d(c, out, k, stride=stride, padding=pad, dilation=dil, groups=groups,
                                  bias=spec.get("bias", True))
            nh = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
            nw = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
        if nh < 1 or nw < 1 or nh * nw > 1024:
            raise InvalidSpec("spatial size")
        self.act = spec.get("act", "none")
        self.out_shape = (out, nh, nw)

    def forward(self, x):
        return ACTS[self.act](self.conv(x))


class Norm2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple, gen: torch.Generator) -> None:
        super().__init__()
        self.kind = spec["norm"]
        self.norm = _make_norm(self.kind, shape[0], 2, spec, gen, True)
        self.out_shape = shape

    def forward(self, x):
        if self.kind in ("layer", "rms"):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(x)


class Pool2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        c, h, w = shape
        self.kind = spec.get("pool", "max")
        if self.kind == "adaptive":
            self.size = max(1, min(h, w) // 2)
            self.out_shape = (c, self.size, self.size)
        else:
            if h < 2 or w < 2:
                raise InvalidSpec("pool")
            self.out_shape = (c, h // 2, w // 2)

    def forward(self, x):
        if self.kind == "adaptive":
            return F.adaptive_avg_pool2d(x, self.size)
        return F.max_pool2d(x, 2) if self.kind == "max" else F.avg_pool2d(x, 2)


class PixelShuffle(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        c, h, w = shape
        self.up = spec.get("up", True)
        if self.up:
            if c % 4:
                raise InvalidSpec("pixel_shuffle needs C % 4 == 0")
            self.out_shape = (c // 4, h * 2, w * 2)
        else:
            if h % 2 or w % 2:
                raise InvalidSpec("pixel_unshuffle needs even H, W")
            self.out_shape = (c * 4, h // 2, w // 2)
        if self.out_shape[1] * self.out_shape[2] > 1024:
            raise InvalidSpec("spatial size")

    def forward(self, x):
        return F.pixel_shuffle(x, 2) if self.up else F.pixel_unshuffle(x, 2)


class Branches2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        c = shape[0]
        if c < 2:
            raise InvalidSpec("C < 2")
        self.how = spec["how"]
        cut = max(1, min(c - 1, int(round(c * spec.get("frac", 0.5)))))
        if self.how == "chunk":
            if c % 2:
                raise InvalidSpec("chunk")
            cut = c // 2
        self.sizes = [cut, c - cut]
        outs = spec.get("outs", [4, 4])
        self.convs = nn.ModuleList(nn.Conv2d(a, outs[i % len(outs)], 1) for i, a in enumerate(self.sizes))
        self.out_shape = (sum(outs[i % len(outs)] for i in range(2)), shape[1], shape[2])

    def forward(self, x):
        if self.how == "split":
            parts = x.split(self.sizes, dim=1)
        elif self.how == "chunk":
            parts = x.chunk(2, dim=1)
        elif self.how == "narrow":
            parts = (x.narrow(1, 0, self.sizes[0]), x.narrow(1, self.sizes[0], self.sizes[1]))
        else:
            parts = (x[:, : self.sizes[0]], x[:, self.sizes[0]:])
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], dim=1)


class SpatialAttention(nn.Module):
    """Attention over the H*W positions of an image (flatten spatial, attend, fold back)."""

    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        self.attn = Attention(spec, shape[0])
        self.out_shape = shape

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        return self.attn(t).transpose(1, 2).reshape(b, c, h, w)


class Select2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple, gen: torch.Generator) -> None:
        super().__init__()
        c = shape[0]
        n = max(1, min(c, spec.get("n", c)))
        self.register_buffer("idx", torch.randperm(c, generator=gen)[:n])
        self.out_shape = (n, shape[1], shape[2])

    def forward(self, x):
        return x.index_select(1, self.idx)


class Expand2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        self.r = spec.get("r", 2)
        c, h, w = shape
        self.out_shape = (c * self.r, h, w)

    def forward(self, x):
        b, c, h, w = x.shape
        return x[:, None].expand(b, self.r, c, h, w).reshape(b, self.r * c, h, w)


class Einsum2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape[0], spec["out"]) / math.sqrt(shape[0]))
        self.out_shape = (spec["out"], shape[1], shape[2])

    def forward(self, x):
        return torch.einsum("bchw,cd->bdhw", x, self.w)


class Pad2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        c, h, w = shape
        self.where = spec.get("where", "spatial")
        self.out_shape = (c, h + 1, w + 1) if self.where == "spatial" else (c + 1, h, w)

    def forward(self, x):
        return F.pad(x, (0, 1, 1, 0)) if self.where == "spatial" else F.pad(x, (0, 0, 0, 0, 0, 1))


class Where2d(nn.Module):
    def __init__(self, spec: dict, shape: tuple) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((shape[0], 1, 1), 0.2))
        self.out_shape = shape

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * x)


# --------------------------------------------------------------------------------------------
# Building a model from a spec
# --------------------------------------------------------------------------------------------
def build_block(spec: dict, shape: tuple, gen: torch.Generator, family: str) -> nn.Module:
    kind = spec["kind"]
    if family == "seq":
        d = shape[0]
        table = {
            "linear": lambda: Linear(spec, d), "mlp": lambda: GatedMLP(spec, d), "norm": lambda: SeqNorm(spec, d, gen),
            "attn": lambda: Attention(spec, d), "conv": lambda: SeqConv(spec, d), "shuffle": lambda: Shuffle(spec, d),
            "branches": lambda: Branches(spec, d), "select": lambda: Select(spec, d, gen), "expand": lambda: Expand(spec, d),
            "pool": lambda: SeqPool(spec, d), "einsum": lambda: Einsum(spec, d), "pad": lambda: Pad(spec, d),
            "where": lambda: Where(spec, d), "residual": lambda: Residual(spec, d, gen, family, shape),
            "gate": lambda: Gate(spec, d, family),
        }
    else:
        table = {
            "conv": lambda: Conv2d(spec, shape), "norm": lambda: Norm2d(spec, shape, gen), "pool": lambda: Pool2d(spec, shape),
            "pixel": lambda: PixelShuffle(spec, shape), "branches": lambda: Branches2d(spec, shape),
            "attn": lambda: SpatialAttention(spec, shape), "select": lambda: Select2d(spec, shape, gen),
            "expand": lambda: Expand2d(spec, shape), "einsum": lambda: Einsum2d(spec, shape), "pad": lambda: Pad2d(spec, shape),
            "where": lambda: Where2d(spec, shape), "residual": lambda: Residual(spec, shape[0], gen, family, shape),
            "gate": lambda: Gate(spec, shape[0], family),
        }
    if kind not in table:
        raise InvalidSpec(f"no {kind} block for {family}")
    blk = table[kind]()
    if not hasattr(blk, "out_shape"):
        blk.out_shape = (blk.out_dim,)
    elif family == "image" and not hasattr(blk, "out_dim"):
        blk.out_dim = blk.out_shape[0]
    if family == "image" and kind in ("residual", "gate"):
        blk.out_shape = shape
    if min(blk.out_shape) < 1:
        raise InvalidSpec("empty output")
    return blk


class FuzzNet(nn.Module):
    """A model from a spec: input stem, blocks, head."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(spec["seed"])
        torch.manual_seed(spec["seed"])
        self.family = spec["family"]
        if self.family == "seq":
            if spec.get("tokens"):
                self.embed = nn.Embedding(spec["vocab"], spec["d"])
            else:
                self.embed = nn.Linear(spec["in_dim"], spec["d"])
            shape: tuple = (spec["d"],)
        else:
            self.embed = nn.Conv2d(spec["in_ch"], spec["c"], 3, padding=1)
            shape = (spec["c"], spec["hw"], spec["hw"])
        blocks = []
        for b in spec["blocks"]:
            blk = build_block(b, shape, gen, self.family)
            blocks.append(blk)
            shape = blk.out_shape
        self.blocks = nn.ModuleList(blocks)
        self.head_kind = spec.get("head", "linear")
        if self.family == "seq":
            self.head = nn.Linear(shape[0], spec.get("n_out", 3))
        else:
            self.head = nn.Linear(shape[0] if self.head_kind != "flatten" else shape[0] * shape[1] * shape[2],
                                  spec.get("n_out", 3))
            if self.head_kind == "map":
                self.head = nn.Conv2d(shape[0], spec.get("n_out", 3), 1)
        self.aux = spec.get("aux", False)

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        if self.family == "seq":
            out = self.head(h)
        elif self.head_kind == "flatten":
            out = self.head(h.flatten(1))
        elif self.head_kind == "map":
            out = self.head(h)
        else:
            out = self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return (out, h.mean()) if self.aux else out


def make_inputs(spec: dict, batch: int, seq: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if spec["family"] == "seq":
        s = seq or spec["seq"]
        if spec.get("tokens"):
            return {"x": torch.randint(0, spec["vocab"], (batch, s), generator=gen)}
        return {"x": torch.randn(batch, s, spec["in_dim"], generator=gen)}
    return {"x": torch.randn(batch, spec["in_ch"], spec["hw"], spec["hw"], generator=gen)}


# ============================================================================================
# The grammar
# ============================================================================================
SEQ_KINDS = ["linear", "mlp", "norm", "attn", "conv", "shuffle", "branches", "select", "expand", "pool",
             "einsum", "pad", "where", "residual", "gate"]
IMG_KINDS = ["conv", "norm", "pool", "pixel", "branches", "attn", "select", "expand", "einsum", "pad",
             "where", "residual", "gate"]
SEQ_NORMS = ["layer", "rms", "batch", "group", "instance", "lrn", "l2"]
IMG_NORMS = ["batch", "group", "instance", "layer", "rms", "lrn"]
CONVS = ["plain", "grouped", "depthwise", "dilated", "strided", "transposed"]


def _size(rng: random.Random) -> int:
    return rng.choice([4, 6, 8, 12, 16])


def _attn_spec(rng: random.Random) -> dict:
    kv = rng.choice([1, 2])
    h = kv * rng.choice([1, 2])
    return {
        "kind": "attn", "heads": h, "kv_heads": kv, "head_dim": rng.choice([2, 3, 4]),
        "v_head_dim": rng.choice([None, 2, 3]) or None,
        "impl": rng.choice(["matmul", "bmm", "einsum", "sdpa", "sdpa", "sdpa_gqa"]),
        "scale": rng.choice(["shape", "shape", "const", "none"]), "repeat": rng.choice(["interleave", "expand"]),
        "causal": rng.random() < 0.4, "rope": rng.random() < 0.3, "bias": rng.random() < 0.7,
    }


def random_block(rng: random.Random, family: str, depth: int = 0) -> dict:
    kinds = SEQ_KINDS if family == "seq" else IMG_KINDS
    if depth > 0:
        kinds = [k for k in kinds if k != "residual"]
    kind = rng.choice(kinds)
    act = rng.choice(list(ACTS))
    if kind == "linear":
        return {"kind": kind, "out": _size(rng), "bias": rng.random() < 0.8, "act": act}
    if kind == "mlp":
        return {"kind": kind, "hidden": _size(rng), "act": rng.choice(["silu", "gelu", "relu"])}
    if kind == "norm":
        return {"kind": kind, "norm": rng.choice(SEQ_NORMS if family == "seq" else IMG_NORMS), "g": rng.randrange(3),
                "affine": rng.random() < 0.8}
    if kind == "attn":
        spec = _attn_spec(rng)
        if spec["v_head_dim"] is None:
            spec.pop("v_head_dim")
        return spec
    if kind == "conv":
        conv = rng.choice(CONVS)
        return {"kind": kind, "conv": conv, "out": _size(rng), "k": rng.choice([1, 3] if conv != "dilated" else [3]),
                "g": rng.randrange(3), "mult": rng.choice([1, 2]), "stride": rng.choice([1, 2]), "act": act,
                "bias": rng.random() < 0.8}
    if kind == "shuffle":
        return {"kind": kind, "a": rng.randrange(3), "style": rng.choice(["view", "unflatten", "permute"])}
    if kind == "branches":
        return {"kind": kind, "how": rng.choice(["split", "chunk", "narrow", "slice"]), "frac": rng.choice([0.25, 0.5, 0.75]),
                "outs": [_size(rng), _size(rng)]}
    if kind == "select":
        return {"kind": kind, "n": rng.choice([2, 3, 4, 6, 8]), "how": rng.choice(["index_select", "gather"])}
    if kind == "expand":
        return {"kind": kind, "r": rng.choice([2, 3]), "out": _size(rng)}
    if kind == "pool":
        return {"kind": kind, "pool": rng.choice(["avg", "max", "adaptive"] if family == "image" else ["avg", "max"]),
                "stride": rng.choice([1, 2])}
    if kind == "pixel":
        return {"kind": kind, "up": rng.random() < 0.5}
    if kind in ("einsum",):
        return {"kind": kind, "out": _size(rng)}
    if kind == "pad":
        return {"kind": kind, "p": rng.choice([1, 2]),
                "where": rng.choice(["feature", "seq"] if family == "seq" else ["spatial", "channel"])}
    if kind == "where":
        return {"kind": kind}
    if kind == "residual":
        return {"kind": kind, "body": [random_block(rng, family, depth + 1) for _ in range(rng.choice([1, 1, 2]))]}
    if kind == "gate":
        return {"kind": kind, "r": rng.choice([1, 2, 4])}
    raise AssertionError(kind)


def random_spec(seed: int, max_blocks: int = 5) -> dict:
    """A random, buildable model spec (retries until the builder accepts one)."""
    rng = random.Random(seed)
    for attempt in range(50):
        family = "seq" if rng.random() < 0.55 else "image"
        spec: dict[str, Any] = {"seed": seed * 101 + attempt, "family": family, "n_out": rng.choice([2, 3, 5]),
                                "aux": rng.random() < 0.1}
        if family == "seq":
            spec.update(tokens=rng.random() < 0.4, vocab=rng.choice([11, 23]), in_dim=rng.choice([3, 5]),
                        d=_size(rng), seq=rng.choice([5, 6, 7]))
        else:
            spec.update(in_ch=rng.choice([1, 3]), c=_size(rng), hw=rng.choice([4, 6, 8]),
                        head=rng.choice(["linear", "linear", "flatten", "map"]))
        spec["blocks"] = [random_block(rng, family) for _ in range(rng.randint(1, max_blocks))]
        try:
            model = FuzzNet(spec).eval()
            with torch.no_grad():
                model(**make_inputs(spec, 2))
            return spec
        except Exception:  # noqa: BLE001 - an invalid combination: draw again
            continue
    raise RuntimeError(f"no buildable spec for seed {seed}")


# ============================================================================================
# Running one model
# ============================================================================================
def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


def rel_diff(ref: Any, got: Any, global_floor: float = 0.0) -> float:
    """Worst over outputs of max |ref - got| / max |ref| (this script's own comparison).

    An output whose difference is below ``global_floor`` times the largest output of the call
    counts as equal: an output that is zero up to cancellation (the mean of a normalised tensor)
    has no scale of its own to be relative to.
    """
    a, b = _leaves(ref), _leaves(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    top = max((float(x.detach().abs().max()) for x in a if x.numel()), default=0.0)
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.detach().double(), y.detach().double()
        if not torch.isfinite(y).all() and torch.isfinite(x).all():
            return math.inf
        d = float((x - y).abs().max()) if x.numel() else 0.0
        s = float(x.abs().max()) if x.numel() else 0.0
        if d <= global_floor * top:
            continue
        worst = max(worst, d / s if s > 0 else (0.0 if d == 0 else math.inf))
    return worst


def _zeroed(model: nn.Module, analysis: Any, plan: dict) -> nn.Module:
    """The original with the removed units' parameter slices set to zero (from the groups' members)."""
    z = copy.deepcopy(model)
    params = dict(z.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for gid, units in plan.items():
            for m in analysis.by_id[gid].params:
                for name in analysis.graph.aliases.get(m.name, [m.name]):
                    if name in params:
                        idx = torch.as_tensor(m.indices(units), dtype=torch.long)
                        params[name].index_fill_(m.dim, idx, 0.0)
                        break
    return z


def _call(model: Any, inputs: dict) -> Any:
    with torch.no_grad():
        return model(**inputs)


def check_shapes(spec: dict) -> list[dict[str, torch.Tensor]]:
    """Two batch sizes (and, for sequences, two lengths) the pruned model must get right."""
    if spec["family"] == "seq":
        return [make_inputs(spec, 2, seed=1), make_inputs(spec, 3, spec["seq"] + 2, seed=2)]
    return [make_inputs(spec, 2, seed=1), make_inputs(spec, 3, seed=2)]


F32_NOISE = 1e-5  # relative: float32 rounding of these tiny models stays far below
F64_BAR = 1e-9


def judge_equal(zeroed: nn.Module, pruned: Any, spec: dict, traced: Any = None,
                compare: bool = True) -> tuple[str, float, str]:
    """('equal'|'differs'|'broken', relative difference, precision that decided).

    ``traced`` is the original traced program: a returned graph is not asked to take a shape
    the trace itself specialised away.  ``compare=False`` only checks that the pruned model
    runs wherever the original does, with the same output shapes (plans with inexact groups).
    """
    worst, ambiguous, ran = 0.0, False, []
    for inputs in check_shapes(spec):
        try:
            ref = _call(zeroed, inputs)
        except Exception:  # noqa: BLE001 - the original does not take this shape
            continue
        if traced is not None and isinstance(pruned, torch.fx.GraphModule):
            try:
                _call(traced, inputs)
            except Exception:  # noqa: BLE001 - specialised by torch.export: not fxprune's doing
                continue
        try:
            got = _call(pruned, inputs)
        except Exception:  # noqa: BLE001 - the original takes it, the pruned model does not
            return "broken", math.inf, "float32"
        if not compare:
            if [t.shape for t in _leaves(ref)] != [t.shape for t in _leaves(got)]:
                return "broken", math.inf, "float32"
            continue
        r = rel_diff(ref, got)
        worst = max(worst, r)
        ran.append(inputs)
        if r > F32_NOISE:
            ambiguous = True
    if not ambiguous:
        return "equal", worst, "float32"
    from fxprune.passes.compare import float64_copy

    z64, p64 = float64_copy(zeroed), float64_copy(pruned)
    worst64 = 0.0
    for inputs in ran:
        i64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        try:
            worst64 = max(worst64, rel_diff(_call(z64, i64), _call(p64, i64), global_floor=1e-12))
        except Exception:  # noqa: BLE001 - a float64 copy that does not run: float32 decides
            return ("equal" if worst <= 1e-4 else "differs"), worst, "float32"
    return ("equal" if worst64 <= F64_BAR else "differs"), worst64, "float64"


def random_plan(analysis: Any, rng: random.Random) -> dict[str, list[int]]:
    plan = {}
    for g in analysis.groups:
        if not g.exact or g.size < 2 or rng.random() < 0.35:
            continue
        k = rng.randint(1, g.size - 1)
        plan[g.id] = sorted(rng.sample(range(g.size), k))
    candidates = [g for g in analysis.groups if g.exact and g.size >= 2]
    if not plan and candidates:
        g = rng.choice(candidates)
        plan[g.id] = sorted(rng.sample(range(g.size), rng.randint(1, g.size - 1)))
    return plan


class _Timeout(BaseException):
    """Not an Exception: fxprune's and torch's ``except Exception`` must not turn it into an error."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """At most ``seconds`` of this process' CPU time (wall time means nothing on a shared machine)."""
    if seconds <= 0 or not hasattr(signal, "SIGVTALRM"):
        yield
        return

    def fire(*_):
        raise _Timeout()

    old = signal.signal(signal.SIGVTALRM, fire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def run_one(spec: dict, *, timeout: float = 60.0) -> dict:
    """Trace, analyse, prune at random and judge one model.  Returns the outcome record."""
    import fxprune
    from fxprune.errors import CaptureError, FxpruneError, VerificationError

    rec: dict[str, Any] = {"seed": spec["seed"], "family": spec["family"], "blocks": [b["kind"] for b in spec["blocks"]]}
    t0, c0 = time.perf_counter(), time.process_time()
    stage = "build"
    try:
        with _time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = FuzzNet(spec).eval()
                with torch.no_grad():
                    model(**make_inputs(spec, 2))
            except Exception as exc:  # noqa: BLE001
                rec.update(outcome="invalid", error=f"{type(exc).__name__}: {exc}"[:300])
                return rec
            stage = "trace"
            graph = fxprune.trace(model, kwargs=make_inputs(spec, 2))
            stage = "analyze"
            analysis = fxprune.analyze(graph)
            rec["groups"] = len(analysis.groups)
            rng = random.Random(spec["seed"])
            via_prune = rng.random() < 0.2
            stage = "prune" if via_prune else "rewrite"
            if via_prune:
                res = fxprune.prune(analysis, rng.choice([0.1, 0.3, 0.5]), importance="random", seed=spec["seed"],
                                    progress=False)
                plan = {k: list(v) for k, v in res.plan.items()}
                result = res.rewrite
            else:
                plan = random_plan(analysis, rng)
                result = fxprune.rewrite(model, analysis, plan) if plan else None
            if not plan or result is None:
                rec.update(outcome="no-groups", exact_groups=sum(g.exact for g in analysis.groups))
                return rec
            rec["plan_groups"] = len(plan)
            rec["exact"] = all(analysis.by_id[g].exact for g in plan)
            stage = "judge"
            verdict, rel, where = judge_equal(_zeroed(model, analysis, plan), result.model, spec,
                                              graph.exported_program.module(), compare=rec["exact"])
            rec.update(rel=rel, judged_in=where, returned=result.returned)
            if result.returned == "graph":
                rec["why_graph"] = " ".join(result.notes)[:300]
            if verdict == "equal":
                rec["outcome"] = ("ok" if result.returned == "module" else "ok-graph") if rec["exact"] else "ok-inexact"
            elif verdict == "broken":
                rec["outcome"] = "broken-at-other-shape"
            else:
                rec["outcome"] = "silently-wrong"
    except _Timeout:
        rec.update(outcome="timeout", stage=stage)
    except VerificationError as exc:
        rec.update(outcome="verify-refused", stage=stage, error=str(exc)[:400])
    except CaptureError as exc:
        rec.update(outcome="capture-error", stage=stage, error=str(exc).splitlines()[0][:300])
    except FxpruneError as exc:
        rec.update(outcome=f"fxprune-error:{type(exc).__name__}", stage=stage, error=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - a crash: recorded with its traceback
        tb = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in tb if "fxprune" in f.filename]
        where = ours[-1] if ours else tb[-1]
        rec.update(outcome=f"crash:{type(exc).__name__}", stage=stage, error=f"{exc}"[:300],
                   at=f"{os.path.relpath(where.filename)}:{where.lineno} in {where.name}")
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        rec["cpu_seconds"] = round(time.process_time() - c0, 2)
    return rec


FAILURES = ("silently-wrong", "broken-at-other-shape", "verify-refused", "crash:", "timeout")


def is_failure(outcome: str) -> bool:
    return any(outcome.startswith(f) for f in FAILURES)


# ============================================================================================
# The minimiser
# ============================================================================================
def _shrink_candidates(spec: dict) -> list[dict]:
    """Smaller variants of a spec: fewer blocks, inner blocks hoisted, smaller sizes."""
    out = []
    blocks = spec["blocks"]
    for i in range(len(blocks)):
        out.append({**spec, "blocks": blocks[:i] + blocks[i + 1:]})
        if blocks[i]["kind"] == "residual":
            out.append({**spec, "blocks": blocks[:i] + blocks[i]["body"] + blocks[i + 1:]})
            body = blocks[i]["body"]
            for j in range(len(body)):
                if len(body) > 1:
                    nb = {**blocks[i], "body": body[:j] + body[j + 1:]}
                    out.append({**spec, "blocks": blocks[:i] + [nb] + blocks[i + 1:]})
    for key in ("d", "c", "hw", "seq", "in_dim", "in_ch", "vocab", "n_out"):
        if key in spec and isinstance(spec[key], int) and spec[key] > 2:
            out.append({**spec, key: max(2, spec[key] // 2)})
            out.append({**spec, key: spec[key] - 1})
    for key in ("aux",):
        if spec.get(key):
            out.append({**spec, key: False})
    for i, b in enumerate(blocks):
        for key in ("out", "hidden", "heads", "kv_heads", "head_dim", "v_head_dim", "n", "r", "mult", "k", "p"):
            v = b.get(key)
            if isinstance(v, int) and v > 1:
                smaller = max(1, v // 2) if v > 3 else v - 1
                out.append({**spec, "blocks": blocks[:i] + [{**b, key: smaller}] + blocks[i + 1:]})
        for key in ("rope", "causal", "bias"):
            if b.get(key):
                out.append({**spec, "blocks": blocks[:i] + [{**b, key: False}] + blocks[i + 1:]})
    return out


def _signature(rec: dict) -> str:
    return rec["outcome"] + ("|" + rec.get("at", "") if rec["outcome"].startswith("crash") else "")


def minimise(spec: dict, rec: dict, *, budget: int = 150, timeout: float = 60.0) -> tuple[dict, dict]:
    """Shrink ``spec`` while the outcome (and a crash's location) stays the same."""
    target = _signature(rec)
    best, best_rec, tries = spec, rec, 0
    improved = True
    while improved and tries < budget:
        improved = False
        for cand in _shrink_candidates(best):
            if tries >= budget:
                break
            tries += 1
            try:
                FuzzNet(cand)
            except Exception:  # noqa: BLE001 - not buildable at these sizes
                continue
            r = run_one(cand, timeout=timeout)
            if _signature(r) == target:
                best, best_rec, improved = cand, r, True
                break
    return best, best_rec


def spec_size(spec: dict) -> int:
    def count(blocks):
        return sum(1 + count(b.get("body", [])) for b in blocks)

    return count(spec["blocks"])


# ============================================================================================
# The campaign
# ============================================================================================
def _run_index(job: tuple[int, int, int, float, bool]) -> tuple[dict, dict | None]:
    """Model ``i`` of campaign ``seed``: its record, and its (minimised) failure if it failed."""
    seed, i, max_blocks, timeout, minimise_failures = job
    torch.set_num_threads(1)
    spec = random_spec(seed * 1_000_003 + i, max_blocks)
    rec = run_one(spec, timeout=timeout)
    rec["index"] = i
    failure = None
    if is_failure(rec["outcome"]):
        small, small_rec = minimise(spec, rec) if minimise_failures else (spec, rec)
        failure = {"index": i, "outcome": rec["outcome"], "error": rec.get("error"), "at": rec.get("at"),
                   "spec": spec, "minimised": small, "minimised_blocks": spec_size(small),
                   "minimised_record": small_rec}
    return rec, failure


def run_campaign(n: int, seed: int, *, chunk: int, max_blocks: int, out_dir: str | None, minimise_failures: bool,
                 timeout: float, quiet: bool = False, workers: int = 1) -> dict:
    counts: collections.Counter = collections.Counter()
    failures: list[dict] = []
    records: list[dict] = []
    t0 = time.perf_counter()
    pool = None
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        path = os.path.join(out_dir, f"chunk_{seed}_{start:06d}_{stop:06d}.json") if out_dir else None
        if path and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        else:
            data = {"records": [], "failures": []}
            jobs = [(seed, i, max_blocks, timeout, minimise_failures) for i in range(start, stop)]
            results = pool.map(_run_index, jobs) if pool is not None else map(_run_index, jobs)
            for rec, failure in results:
                data["records"].append(rec)
                if failure is not None:
                    data["failures"].append(failure)
                if not quiet:
                    print(f"[{rec['index'] + 1}/{n}] {rec['outcome']:<28} {rec.get('seconds', 0):>6.2f}s  "
                          f"{rec['family']:<5} {'+'.join(rec['blocks'])}", flush=True)
            if path:
                os.makedirs(out_dir, exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f, indent=1, default=str)
                os.replace(tmp, path)
        records.extend(data["records"])
        failures.extend(data["failures"])
    if pool is not None:
        pool.shutdown()
    for r in records:
        counts[r["outcome"]] += 1
    return {"n": len(records), "seed": seed, "max_blocks": max_blocks, "counts": dict(sorted(counts.items())),
            "seconds": round(time.perf_counter() - t0, 1), "failures": failures,
            "block_kinds": dict(collections.Counter(k for r in records for k in r["blocks"])),
            "families": dict(collections.Counter(r["family"] for r in records)),
            "float64_judged": sum(1 for r in records if r.get("judged_in") == "float64"),
            "cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in records), 1),
            "max_rel_ok": max((r.get("rel", 0.0) for r in records if r["outcome"].startswith("ok")), default=0.0)}


def print_table(summary: dict) -> None:
    print(f"\n{summary['n']} models (seed {summary['seed']}, {summary['seconds']:.0f} s); "
          f"{summary['float64_judged']} judged in float64")
    width = max((len(k) for k in summary["counts"]), default=8)
    print(f"{'outcome'.ljust(width)}  count  share")
    for k, v in sorted(summary["counts"].items(), key=lambda kv: -kv[1]):
        print(f"{k.ljust(width)}  {v:>5}  {v / max(1, summary['n']):6.1%}")
    for f in summary["failures"]:
        print(f"  FAIL #{f['index']}: {f['outcome']} ({f.get('error') or ''})"[:200])
        print(f"    minimised to {f['minimised_blocks']} block(s): {json.dumps(f['minimised']['blocks'])}"[:300])


CAMPAIGN = 5000
"""Models in the full campaign (``--n``'s default)."""

OUTCOME_MEANING = {
    "ok": "equal to the zeroed original; the user's class returned",
    "ok-graph": "equal to the zeroed original; the rewritten graph returned",
    "ok-inexact": "inexact groups in the plan: runs at every shape with the right output shapes",
    "no-groups": "nothing prunable (every space frozen)",
    "capture-error": "torch.export refused the model (a clear fxprune error)",
    "verify-refused": "fxprune's own check refused its result (safe, a missed analysis case)",
    "silently-wrong": "reported verified, differs from the zeroed original in float64",
    "broken-at-other-shape": "the returned model fails at a shape the original takes",
    "invalid": "the generated model itself does not run (not counted)",
    "timeout": "over the CPU-time limit per model",
}


def readme_section(summary: dict, command: str) -> str:
    """The README's fuzzing section: what ran, the counts per outcome, the failures."""
    n = summary["n"]
    kinds = summary["block_kinds"]
    lines = [
        "## Fuzzing campaign",
        "",
        f"`{command}` (generated by it; counts and minimised failures in `bench/results/fuzz.json`). "
        f"{n} random models ({', '.join(f'{v} {k}' for k, v in sorted(summary['families'].items()))}; "
        f"{len(kinds)} block kinds), each traced, analysed, pruned at random and compared with the zeroed "
        "original at two batch sizes (and two sequence lengths), relative to each output's scale, "
        f"judged again in float64 where float32 was ambiguous ({summary['float64_judged']} models). "
        f"Largest relative difference accepted as equal: {summary['max_rel_ok']:.2g}. "
        f"{summary['cpu_seconds']:.0f} CPU s in all. CI runs a seeded slice of 200 (`tests/test_fuzz.py`).",
        *([] if n >= CAMPAIGN else ["", f"**Partial:** the campaign is {CAMPAIGN} models; this run covers the first {n} "
                                            "(the CPU time this machine had). `python bench/fuzz.py --chunk 50` runs the rest, reusing the "
                                            "chunks stored in `bench/results/fuzz/`."]),
        "",
        "| outcome | models | share | meaning |",
        "|---|---|---|---|",
    ]
    for k, v in sorted(summary["counts"].items(), key=lambda kv: -kv[1]):
        meaning = OUTCOME_MEANING.get(k) or ("a clear fxprune error" if k.startswith("fxprune-error") else
                                            "an exception that is not an fxprune error" if k.startswith("crash")
                                            else "")
        lines.append(f"| {k} | {v} | {v / max(1, n):.1%} | {meaning} |")
    fails = summary["failures"]
    lines.append("")
    lines.append(f"Failures: {len(fails)}." + ("" if not fails else " Minimised: " + "; ".join(
        f"#{f['index']} {f['outcome']} ({f['minimised_blocks']} block(s))" for f in fails[:10])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=CAMPAIGN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--max-blocks", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="CPU seconds per model")
    p.add_argument("--no-minimise", action="store_true")
    p.add_argument("--workers", type=int, default=1, help="processes (each model runs in one)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=os.path.join(RESULTS, "fuzz.json"))
    p.add_argument("--chunks-dir", default=os.path.join(RESULTS, "fuzz"))
    p.add_argument("--replay", help="a spec JSON file (or a failure record) to run once, verbosely")
    p.add_argument("--index", type=int, help="run model INDEX of --seed's campaign once, verbosely")
    p.add_argument("--readme", action="store_true", help="write the counts into README.md's fuzz section")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.index is not None:
        spec = random_spec(args.seed * 1_000_003 + args.index, args.max_blocks)
        print(json.dumps(spec))
        print(json.dumps(run_one(spec, timeout=args.timeout), indent=1, default=str))
        return 0
    if args.replay:
        with open(args.replay) as f:
            spec = json.load(f)
        spec = spec.get("minimised", spec)
        print(json.dumps(run_one(spec, timeout=args.timeout), indent=1, default=str))
        return 0
    summary = run_campaign(args.n, args.seed, chunk=args.chunk, max_blocks=args.max_blocks,
                           out_dir=args.chunks_dir or None, minimise_failures=not args.no_minimise,
                           timeout=args.timeout, quiet=args.quiet, workers=args.workers)
    print_table(summary)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        print(f"results written to {args.out}")
    if args.readme:
        from bench.arch_sweep import replace_readme_section

        command = f"python bench/fuzz.py --n {args.n} --seed {args.seed} --max-blocks {args.max_blocks}"
        replace_readme_section("fuzz", readme_section(summary, command),
                               os.path.join(os.path.dirname(RESULTS), os.pardir, "README.md"))
    return 1 if any(is_failure(k) for k in summary["counts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
