"""The core vocabulary as small value types, so that every pass speaks the same words.

* :class:`TensorRef`: one tensor of the exported graph (a node, or one output of a node).
* :class:`ArgPath`: where a shape constant sits in a node's arguments.
* Layout factors :class:`Atom` and :class:`Concat`: how one tensor dimension is built from
  units of pruning (see :mod:`fxprune.graph`).
* ``Literal`` vocabularies: :data:`GroupKind`, :data:`MemberKind`, :data:`ZeroKind`,
  :data:`SplitKind`, and the :class:`Tag` enum that rules attach to index spaces.

They are ``NamedTuple``/``Enum`` so that they hash, compare and print like the tuples they
replace, and a misspelt kind is caught where it is made instead of where it is read.
"""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple, Union, get_args


class TensorRef(NamedTuple):
    """A tensor of the exported graph: node ``node``'s value, or its ``index``-th output."""

    node: str
    index: int | None = None

    def __str__(self) -> str:
        return self.node if self.index is None else f"{self.node}[{self.index}]"


class ArgPath(NamedTuple):
    """Where a shape constant lives in an FX node.

    ``ArgPath("args", 1, 2)`` is ``node.args[1][2]``; ``ArgPath("kwargs", "groups")`` is
    ``node.kwargs["groups"]``; ``ArgPath("split", k)`` is the size of output ``k`` of a split
    (rewritten into ``split_with_sizes``).
    """

    where: Literal["args", "kwargs", "split"]
    key: int | str
    sub: int | None = None

    def __str__(self) -> str:
        if self.where == "split":
            return f"split[{self.key}]"
        base = f"{self.where}[{self.key!r}]"
        return base if self.sub is None else f"{base}[{self.sub}]"


class Atom(NamedTuple):
    """A layout factor: ``size`` units of the coupled class ``cls`` (size -1 when symbolic)."""

    cls: int
    size: int


class Concat(NamedTuple):
    """A layout factor: sub-layouts laid end to end along the same dimension (fused QKV, RoPE halves)."""

    parts: tuple["Layout", ...]


Factor = Union[Atom, Concat]
Layout = tuple  # tuple[Factor, ...]: a row-major product of factors

GroupKind = Literal["heads", "kv_heads", "head_repeat", "head_dim", "channels", "hidden", "experts", "blocks"]
"""What a group's units are, as the planner and report name them.

* ``heads``: attention heads (MHA); ``kv_heads``: GQA/MQA key/value groups with their queries;
* ``head_repeat``: query heads per kv group; ``head_dim``: q/k (RoPE pairs) or v head dim;
* ``channels``: MLP intermediate channels, conv filters, expert FFN width;
* ``hidden``: the residual width with embeddings and norms;
* ``experts``: MoE experts (a unit removes one expert's weights, its router row and its share
  of the routing);
* ``blocks``: residual branches (a unit removes one ``f`` from ``x + f(x)``; see
  :mod:`fxprune.passes.depth`).
"""
GROUP_KINDS: tuple[str, ...] = get_args(GroupKind)

MemberKind = Literal["parameter", "buffer", "activation"]
"""What a group member is: a parameter, a buffer (RoPE ``inv_freq``), or a pure activation."""

ZeroKind = Literal["param", "pass", "contract", "probe", "never"]
"""How an op's output can be zero on removed units (see :class:`fxprune.passes.rules.ZeroSpec`)."""

SplitKind = Literal["prod", "sum"]
"""How an index space splits into sub-spaces: a row-major product or a concatenation."""


class Tag(str, enum.Enum):
    """Facts rules attach to index spaces; the analysis reads them to name a group's kind."""

    HEADS = "heads"  # the batch dim of an activation x activation product (attention)
    HEAD_DIM = "head_dim"  # the contracted / value dim of attention
    BROADCAST = "broadcast"  # created by expand/repeat (GQA repeats)
    EMBEDDING_DIM = "embedding_dim"  # an embedding table's feature dim
    NORMALIZED = "normalized"  # a norm or mean reduces over it (the residual width)
    EXPERTS = "experts"  # a router's top-k picks among its units (MoE experts)

    def __str__(self) -> str:
        return self.value


class NormScale(NamedTuple):
    """An RMS normalisation ``x * rsqrt(mean(x**2) + eps) * (weight + offset)`` over a prunable dim.

    With the removed units of ``x`` zero, the mean over the kept ``d'`` of ``d`` units is
    ``d/d'`` times the original one.  The rewrite keeps the norm's output equal to the zeroed
    original by scaling ``weight + offset`` by ``sqrt(d/d')`` and ``eps`` by ``d/d'``.
    ``weight`` is the weight's placeholder node at analysis time, its FQN in an ``Analysis``;
    ``layout`` the normalised dim's layout (None while the rule runs).
    """

    weight: str
    offset: float
    eps_node: str
    eps_path: ArgPath
    eps: float
    layout: Layout | None = None
