"""Index-space algebra behind the analysis: atoms, their splits, and a union-find over them.

Every tensor dimension is a row-major product of *atoms*.  Ops tie the atoms of their inputs and
outputs together (``unify_prod``), split one atom into a product of smaller ones (a reshape of
4096 into 32 heads x 128), or into a concatenation of segments (``carve``: a slice, a fused-QKV
split, RoPE's two halves).  Atoms that end up in the same union-find class are one index space;
the *leaf* classes (never split) are the units of pruning.

Splits live on class roots, so every atom in a class shares the same sub-atoms: refining one view
of an index space refines them all.  When two views cannot be reconciled (a product against a
concatenation, sizes that do not divide), the spaces involved are frozen instead of guessed at.

Symbolic (dynamic) sizes take part too: a ``[B*H]`` dim with a dynamic batch ``B`` and a static
head count ``H`` factors into ``[B, H]`` like a static one, because the ratio of the two sizes is a
monomial.  A dynamic space is frozen for being dynamic (:data:`SYMBOLIC`), but that freeze stays on
the dynamic factor: it does not spread to the static factors it is split into, while every other
freeze of an enclosing space does.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Sequence, Union

import sympy

from fxprune.types import Atom, Concat, SplitKind, Tag

Size = Union[int, sympy.Expr]

SYMBOLIC = "symbolic (dynamic) dimension"
"""The freeze reason of a space whose size is dynamic; it applies to that space only, never to the
static sub-spaces it is split into (see :meth:`AtomStore.freeze_of`)."""


@dataclasses.dataclass
class Split:
    kind: SplitKind
    parts: list[int]


class Site(NamedTuple):
    """Where a tie, split or freeze came from: the FX node, its ATen op and the user's source line."""

    node: str
    op: str
    source: str

    def __str__(self) -> str:
        return f"{self.op} at node {self.node} ({self.source})"


class Freeze(NamedTuple):
    """Why a class is frozen, which atom the freeze was applied to, and where."""

    reason: str
    atom: int
    site: Site | None


class Edge(NamedTuple):
    """A recorded step of the analysis: ``a`` and ``b`` became one space (``tie``), or ``b`` is a
    sub-space of ``a`` (``split``), by the rule of the op at ``site``."""

    a: int
    b: int
    how: str  # "tie" | "split"
    site: Site | None


class AtomStore:
    """Union-find over atoms with per-class splits, freeze reasons and inexact reasons.

    It also keeps the *provenance* of every tie and split (:attr:`edges`, with the :class:`Site`
    of the op whose rule made it) and of every freeze, so that the coupling graph can answer
    "why are these two coupled" and "why is this frozen" without a second analysis.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[Size] = []
        self.split: dict[int, Split] = {}
        self.split_parents: dict[int, set[int]] = {}  # root -> atoms whose split contains it
        self.frozen: dict[int, Freeze] = {}
        self.inexact: dict[int, list[str]] = {}
        self.tags: dict[int, set[Tag]] = {}
        self.edges: list[Edge] = []
        self.freeze_log: list[Freeze] = []  # every freeze applied, first or not (coverage report)
        self.touched: set[int] = set()  # atoms a rule tied, split or froze (for duty checks)
        self.site: Site | None = None  # the op being visited; set by the analysis

    # ----------------------------------------------------------------- basics
    def new(self, size: Size, frozen: str | None = None) -> int:
        atom = len(self.parent)
        self.parent.append(atom)
        self.size.append(size)
        if frozen:
            self._put_freeze(atom, Freeze(frozen, atom, self.site))
            self.touched.add(atom)
        elif not isinstance(size, int):
            self._put_freeze(atom, Freeze(SYMBOLIC, atom, self.site))
            self.touched.add(atom)
        return atom

    def _put_freeze(self, root: int, freeze: Freeze, log: bool = True) -> None:
        """Record a freeze on a class root: the first reason wins, except that a real reason
        replaces "symbolic" (which only applies to the dynamic space itself)."""
        if log and freeze.reason != SYMBOLIC:
            self.freeze_log.append(freeze)
        old = self.frozen.get(root)
        if old is None or (old.reason == SYMBOLIC and freeze.reason != SYMBOLIC):
            self.frozen[root] = freeze

    def find(self, atom: int) -> int:
        root = atom
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[atom] != root:  # path compression
            self.parent[atom], atom = root, self.parent[atom]
        return root

    def is_int(self, atom: int) -> bool:
        return isinstance(self.size[self.find(atom)], int)

    def freeze(self, atoms: Iterable[int], reason: str) -> None:
        for atom in atoms:
            root = self.find(atom)
            self.touched.add(atom)
            self._put_freeze(root, Freeze(reason, atom, self.site))

    def mark_inexact(self, atoms: Iterable[int], reason: str) -> None:
        for atom in atoms:
            reasons = self.inexact.setdefault(self.find(atom), [])
            if reason not in reasons and len(reasons) < 8:
                reasons.append(reason)

    def tag(self, atoms: Iterable[int], tag: Tag) -> None:
        for atom in atoms:
            self.tags.setdefault(self.find(atom), set()).add(tag)

    def set_split(self, atom: int, kind: SplitKind, parts: Sequence[int]) -> None:
        root = self.find(atom)
        assert root not in self.split
        self.split[root] = Split(kind, list(parts))
        self.touched.add(atom)
        for part in parts:
            self.touched.add(part)
            self.split_parents.setdefault(self.find(part), set()).add(root)
            self.edges.append(Edge(atom, part, "split", self.site))

    def make(self, kind: SplitKind, parts: Sequence[int]) -> int:
        """A fresh atom that is the product or concatenation of ``parts``."""
        if len(parts) == 1:
            return parts[0]
        sizes = [self.size[self.find(p)] for p in parts]
        if kind == "prod":
            total: Size = 1
            for s in sizes:
                total = total * s
        else:
            total = sum(sizes)
        atom = self.new(total)
        self.set_split(atom, kind, parts)
        return atom

    # -------------------------------------------------------------- unification
    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self.touched.update((a, b))
        if ra == rb:
            return
        self.edges.append(Edge(a, b, "tie", self.site))
        if self.size[ra] != self.size[rb]:
            self._conflict([ra, rb], f"size mismatch {self.size[ra]} vs {self.size[rb]}")
            return
        sa, sb = self.split.pop(ra, None), self.split.pop(rb, None)
        self.parent[rb] = ra
        if rb in self.frozen:
            self._put_freeze(ra, self.frozen.pop(rb), log=False)
        if rb in self.inexact:
            for r in self.inexact.pop(rb):
                self.mark_inexact([ra], r)
        if rb in self.tags:
            self.tags.setdefault(ra, set()).update(self.tags.pop(rb))
        if rb in self.split_parents:
            self.split_parents.setdefault(ra, set()).update(self.split_parents.pop(rb))
        if sa is not None:
            self.split[ra] = sa
        elif sb is not None:
            self.split[ra] = sb
        if sa is not None and sb is not None:
            if sa.kind != sb.kind:
                self._conflict(sa.parts + sb.parts + [ra], "a space is both a product and a concatenation")
            elif sa.kind == "prod":
                self.unify_prod(sa.parts, sb.parts)
            else:
                self.unify_sum(sa.parts, sb.parts)

    def _conflict(self, atoms: Iterable[int], reason: str) -> None:
        """Freeze every space involved in a tie we cannot express, recursively through splits."""
        stack = list(atoms)
        seen: set[int] = set()
        while stack:
            root = self.find(stack.pop())
            if root in seen:
                continue
            seen.add(root)
            self.touched.add(root)
            self._put_freeze(root, Freeze(reason, root, self.site))
            if root in self.split:
                stack.extend(self.split[root].parts)

    def unify_prod(self, seq_a: Sequence[int], seq_b: Sequence[int]) -> bool:
        """Tie two row-major products of atoms that index the same space, refining as needed."""
        a = list(reversed(seq_a))
        b = list(reversed(seq_b))
        while a and b:
            x, y = self.find(a.pop()), self.find(b.pop())
            if x == y:
                continue
            sx, sy = self.size[x], self.size[y]
            if sx == sy:
                self.union(x, y)
                continue
            split_x, split_y = self.split.get(x), self.split.get(y)
            if split_x is not None and split_x.kind == "prod":
                a.extend(reversed(split_x.parts))
                b.append(y)
                continue
            if split_y is not None and split_y.kind == "prod":
                b.extend(reversed(split_y.parts))
                a.append(x)
                continue
            if not (isinstance(sx, int) and isinstance(sy, int)):
                order = _symbolic_order(sx, sy)
                if order is None:
                    self._conflict([x, y, *a, *b], "symbolic sizes do not line up")
                    return False
                big, small, big_stack, ratio = (x, y, a, order[1]) if order[0] else (y, x, b, order[1])
                if big in self.split:
                    self._conflict([x, y, *a, *b], f"sizes {sx} and {sy} do not factor")
                    return False
                if self.frozen.get(big) is not None and self.frozen[big].reason == SYMBOLIC:
                    del self.frozen[big]  # the dynamic part moves to the symbolic factor below
                head, tail = self.new(self.size[small]), self.new(ratio)
                self.set_split(big, "prod", [head, tail])
                self.union(head, small)
                big_stack.append(tail)
                continue
            big, small, big_stack = (x, y, a) if sx > sy else (y, x, b)
            sbig, ssmall = max(sx, sy), min(sx, sy)
            if sbig % ssmall != 0 or big in self.split:
                self._conflict([x, y, *a, *b], f"sizes {sx} and {sy} do not factor")
                return False
            head, tail = self.new(ssmall), self.new(sbig // ssmall)
            self.set_split(big, "prod", [head, tail])
            self.union(head, small)
            big_stack.append(tail)
        if a or b:
            self._conflict([*a, *b], "products of different sizes")
            return False
        return True

    def unify_sum(self, seq_a: Sequence[int], seq_b: Sequence[int]) -> bool:
        """Tie two concatenations of segments that index the same space, aligning offsets."""
        a = list(reversed(seq_a))
        b = list(reversed(seq_b))
        guard = 0
        while a and b:
            guard += 1
            if guard > 10_000:
                self._conflict([*a, *b], "concatenation alignment did not converge")
                return False
            x, y = self.find(a.pop()), self.find(b.pop())
            if x == y:
                continue
            sx, sy = self.size[x], self.size[y]
            if sx == sy:
                self.union(x, y)
                continue
            if not (isinstance(sx, int) and isinstance(sy, int)):
                self._conflict([x, y, *a, *b], "symbolic concatenation")
                return False
            big, small, big_stack = (x, y, a) if sx > sy else (y, x, b)
            small_stack = b if big_stack is a else a
            split_big = self.split.get(big)
            if split_big is not None and split_big.kind == "sum":
                big_stack.extend(reversed(split_big.parts))
                small_stack.append(small)
                continue
            if split_big is not None:
                self._conflict([x, y, *a, *b], "a product split meets a concatenation")
                return False
            ssmall, sbig = min(sx, sy), max(sx, sy)
            head, tail = self.new(ssmall), self.new(sbig - ssmall)
            self.set_split(big, "sum", [head, tail])
            self.union(head, small)
            big_stack.append(tail)
        if a or b:
            self._conflict([*a, *b], "concatenations of different sizes")
            return False
        return True

    def carve(self, atoms: Sequence[int], start: int, end: int) -> list[int] | None:
        """Atoms whose concatenation is exactly indices [start, end) of the product ``atoms``.

        Refines splits as needed.  Returns None (after freezing) when the range cuts across a
        product in a way no concatenation can describe.
        """
        if not atoms:
            return None
        atom = atoms[0] if len(atoms) == 1 else self.make("prod", atoms)
        return self._carve_one(atom, start, end)

    def _carve_one(self, atom: int, start: int, end: int) -> list[int] | None:
        root = self.find(atom)
        n = self.size[root]
        if not isinstance(n, int):
            return None
        if start == 0 and end == n:
            return [root]
        split = self.split.get(root)
        if split is None:
            cuts = sorted({0, start, end, n})
            parts = [self.new(hi - lo) for lo, hi in zip(cuts, cuts[1:])]
            self.set_split(root, "sum", parts)
            return [p for p, lo in zip(parts, cuts) if start <= lo < end]
        if split.kind == "sum":
            out: list[int] = []
            offset = 0
            for part in split.parts:
                psize = self.size[self.find(part)]
                lo, hi = max(start, offset), min(end, offset + psize)
                if lo < hi:
                    sub = self._carve_one(part, lo - offset, hi - offset)
                    if sub is None:
                        return None
                    out.extend(sub)
                offset += psize
            return out
        inner = 1
        for part in split.parts[1:]:
            inner *= self.size[self.find(part)]
        if start % inner or end % inner:
            self._conflict([root], "a slice cuts across a product of atoms")
            return None
        outer = self._carve_one(split.parts[0], start // inner, end // inner)
        if outer is None:
            return None
        return [self.make("prod", [o, *split.parts[1:]]) for o in outer]

    # ------------------------------------------------------------------ layout
    def layout(self, atoms: Sequence[int]) -> tuple:
        """The layout (see fxprune.graph) of a product of atoms, in terms of leaf classes."""
        factors: list = []
        for atom in atoms:
            factors.extend(self._atom_layout(atom))
        return tuple(factors)

    def _atom_layout(self, atom: int) -> list:
        root = self.find(atom)
        split = self.split.get(root)
        if split is None:
            size = self.size[root]
            return [Atom(root, size if isinstance(size, int) else -1)]
        if split.kind == "prod":
            out: list = []
            for part in split.parts:
                out.extend(self._atom_layout(part))
            return out
        return [Concat(tuple(tuple(self._atom_layout(p)) for p in split.parts))]

    def ancestors(self, root: int) -> set[int]:
        """Every class whose split (transitively) contains ``root``."""
        seen: set[int] = set()
        stack = [root]
        while stack:
            r = self.find(stack.pop())
            for parent in self.split_parents.get(r, ()):
                p = self.find(parent)
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    def freeze_of(self, root: int) -> Freeze | None:
        """The freeze that applies to a class: its own, else one of an enclosing space's.

        An enclosing space frozen only for being dynamic (``[B*H]``) does not freeze its static
        factors (``H``): whatever could not follow them was frozen with its own reason.
        """
        root = self.find(root)
        if root in self.frozen:
            return self.frozen[root]
        for anc in sorted(self.ancestors(root)):
            if anc in self.frozen and self.frozen[anc].reason != SYMBOLIC:
                return self.frozen[anc]
        return None

    def leaves(self, atom: int) -> list[int]:
        """The leaf classes an atom is (transitively) split into (itself when it is not split)."""
        root = self.find(atom)
        split = self.split.get(root)
        if split is None:
            return [root]
        out: list[int] = []
        for part in split.parts:
            for leaf in self.leaves(part):
                if leaf not in out:
                    out.append(leaf)
        return out

    def frozen_reason(self, root: int) -> str | None:
        freeze = self.freeze_of(root)
        return freeze.reason if freeze is not None else None

    def inexact_reasons(self, root: int) -> list[str]:
        root = self.find(root)
        reasons = list(self.inexact.get(root, ()))
        for anc in self.ancestors(root):
            for r in self.inexact.get(anc, ()):
                if r not in reasons:
                    reasons.append(r)
        return reasons

    def all_tags(self, root: int) -> set[Tag]:
        return set(self.tags.get(self.find(root), ()))


def _symbolic_order(sx: Size, sy: Size) -> tuple[bool, Size] | None:
    """(x is the bigger one, bigger / smaller) when one symbolic size is a monomial multiple of the
    other (``4*s0`` and ``s0``; ``s0*s1`` and ``s1``), else None."""
    for x_big, big, small in ((True, sx, sy), (False, sy, sx)):
        ratio = sympy.simplify(sympy.sympify(big) / sympy.sympify(small))
        if ratio == 1:
            continue
        if _is_monomial(ratio):
            return x_big, (int(ratio) if ratio.is_Integer else ratio)
    return None


def _is_monomial(expr: sympy.Expr) -> bool:
    """A product of positive integers and symbols (a size the other one divides row-major)."""
    factors = expr.args if expr.is_Mul else (expr,)
    for f in factors:
        if f.is_Integer:
            if int(f) < 1:
                return False
        elif f.is_Pow:
            if not (f.base.is_Symbol and f.exp.is_Integer and int(f.exp) > 0):
                return False
        elif not f.is_Symbol:
            return False
    return True
