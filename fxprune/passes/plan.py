"""Planner: choose which units to remove so that a target fraction of parameters goes away.

Input: the analysis' groups, the scoring pass' per-unit scores and a ratio of the model's total
parameters to remove.  Output: a plan ``{group_id: sorted units to remove}`` and an info dict.

Why it is built this way:

* **Exact parameter accounting.**  Several groups can shrink the same tensor (``heads`` and
  ``head_dim`` both shrink ``q_proj.weight`` dim 0; ``hidden`` shrinks its dim 1), so summing
  "parameters per unit" over groups over-counts.  The planner counts a parameter's remaining
  size as ``rest * prod(kept size of each pruned dim)`` (see :func:`count_params_after`), where a
  dim's kept size comes from its layout with every group's removed units applied together.
* **Searches over plans that are monotone in one variable**, so bisection hits the target:
  ``uniform`` bisects one fraction shared by every searched group (LLM-Pruner's layer-uniform
  ratio), then tops up whole classes (a kind in every layer) step by step to close the gap, so
  every layer of a kind keeps the same size;
  ``global`` sorts every removable chunk of units by score and bisects the prefix length.
* **Conservative defaults.**  Only ``channels`` (MLP), ``heads`` and ``kv_heads`` are pruned
  unless ``kinds`` says otherwise: ``hidden`` touches every layer and the embeddings and is
  usually inexact (norms), ``head_dim`` breaks RoPE frequency pairs and head_dim-specific
  kernels, and ``head_repeat`` changes the GQA ratio; each of these costs far more quality per
  parameter in the literature (LLM-Pruner, SliceGPT, FLAP all keep them).  ``experts`` removal
  is coarse (a whole expert per unit) and stays opt-in too.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import types
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from fxprune.errors import PlanError
from fxprune.graph import Group, Member, kept_size
from fxprune.passes.base import fxpass
from fxprune.util.names import edge_blocks, matches_prefix

__all__ = ["DEFAULT_KINDS", "ALLOCATIONS", "Plan", "as_plan", "count_params_after", "kind_enabled", "make_plan",
           "make_uniform"]

DEFAULT_KINDS: dict[str, bool] = {
    "channels": True,
    "heads": True,
    "kv_heads": True,
    "head_dim": False,
    "head_repeat": False,
    "hidden": False,
    "experts": False,
    "blocks": False,
}
"""Which group kinds are pruned when ``kinds`` does not mention them (unknown kinds: not pruned)."""

ALLOCATIONS = ("uniform", "global", "cost")

COST_KINDS: dict[str, bool] = {
    "channels": True,
    "heads": True,
    "kv_heads": True,
    "head_dim": False,
    "head_repeat": True,
    "hidden": True,
}
"""Kinds the ``cost`` allocation searches by default: every width kind whose removal the user's own
module class can express (the costs decide between them).  ``head_dim`` stays opt-in
(``kinds={"head_dim": True}``): costs rank it fine, but an HF attention module keeps one
``head_dim`` for q/k and v, so a plan that prunes them differently comes back as the rewritten
graph rather than the user's class.  A criterion may also name kinds it cannot cost
(``Scores.uncosted_kinds``), which then stay opt-in."""


def _groups_of(groups: Any) -> list[Group]:
    """Width groups and blocks groups of an Analysis (or the given sequence as it is)."""
    if hasattr(groups, "groups") and not isinstance(groups, (list, tuple)):
        return list(groups.groups) + list(getattr(groups, "blocks", ()))
    return list(groups)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan(Mapping[str, tuple[int, ...]]):
    """Which units of which groups to remove: a read-only ``{group_id: sorted units}``.

    A plan is validated once, when it is made (:meth:`of`): every group exists, every unit is in
    range, no group loses all its units.  Later passes trust it and only check that it belongs to
    the analysis they are given (same group ids, sizes and classes).  ``info`` is the planner's
    account (target and achieved ratio, exact removed parameters, what was skipped and why).
    """

    units: Mapping[str, tuple[int, ...]]
    class_of: Mapping[str, int]
    sizes: Mapping[str, int]
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, groups: Any, plan: Mapping[str, Iterable[int]], info: Mapping[str, Any] | None = None) -> "Plan":
        """Validate ``plan`` ``{group_id: units}`` against ``groups`` (an Analysis or its groups)."""
        by_id = {g.id: g for g in _groups_of(groups)}
        clean: dict[str, tuple[int, ...]] = {}
        for gid, units in plan.items():
            if gid not in by_id:
                close = [g for g in by_id if gid.split(":")[0] in g][:3]
                hint = f" Did you mean one of {close}?" if close else ""
                raise PlanError(f"plan names unknown group {gid!r}.{hint}")
            group = by_id[gid]
            try:
                us = sorted(set(int(u) for u in units))
            except (TypeError, ValueError):
                raise PlanError(f"plan for group {gid!r} must list unit numbers, got {units!r}.") from None
            bad = [u for u in us if u < 0 or u >= group.size]
            if bad:
                raise PlanError(f"plan for group {gid!r} has units {bad} out of range [0, {group.size}).")
            if len(us) >= group.size and group.kind != "blocks":  # every branch may go: x stays
                raise PlanError(f"plan removes all {group.size} units of group {gid!r}; keep at least one.")
            if us:
                clean[gid] = tuple(us)
        return cls(
            types.MappingProxyType(clean),
            types.MappingProxyType({gid: by_id[gid].class_id for gid in clean}),
            types.MappingProxyType({gid: by_id[gid].size for gid in clean}),
            types.MappingProxyType(dict(info or {})),
        )

    def __getitem__(self, group_id: str) -> tuple[int, ...]:
        return self.units[group_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def removed_by_class(self) -> dict[int, tuple[int, ...]]:
        """The plan keyed by analysis class (what layouts speak)."""
        return {self.class_of[gid]: units for gid, units in self.units.items()}

    def check_against(self, groups: Any) -> None:
        """Raise PlanError unless every planned group exists in ``groups`` with the same size and class."""
        by_id = {g.id: g for g in _groups_of(groups)}
        for gid in self.units:
            g = by_id.get(gid)
            if g is None or g.class_id != self.class_of[gid] or g.size != self.sizes[gid]:
                raise PlanError(f"this plan was made for another analysis: group {gid!r} does not match")

    def as_dict(self) -> dict[str, list[int]]:
        """A plain JSON-able ``{group_id: [units]}``."""
        return {gid: list(units) for gid, units in self.units.items()}

    def __repr__(self) -> str:
        return f"Plan(groups={len(self.units)}, units={sum(len(u) for u in self.units.values())})"


def as_plan(groups: Any, plan: Any) -> Plan:
    """``plan`` as a :class:`Plan` for ``groups``: validated if it is a dict, checked if it is a Plan."""
    if isinstance(plan, Plan):
        plan.check_against(groups)
        return plan
    if not isinstance(plan, Mapping):
        raise PlanError(f"a plan is a {{group_id: [units]}} mapping or a Plan, got {type(plan).__name__}")
    return Plan.of(groups, plan)


# --------------------------------------------------------------------------------------------
# Exact parameter counting
# --------------------------------------------------------------------------------------------


UnitsOf = Callable[[str], Sequence[int]]  # group id -> removed units (only asked when needed)


@dataclasses.dataclass
class _Dim:
    """All members (from any group) that shrink one dim of one parameter."""

    size: int
    members: list[tuple[str, Member]]  # (group id, member)

    def kept(self, counts: Mapping[str, int], units_of: UnitsOf) -> int:
        """Kept size of this dim when ``counts[gid]`` units of each group go (exact, all groups
        applied together)."""
        active = [(gid, m) for gid, m in self.members if counts.get(gid)]
        if not active:
            return self.size
        layouts = {m.layout for _, m in active}
        if len(layouts) == 1:
            removed = {m.class_id: counts[gid] for gid, m in active}
            return kept_size(next(iter(layouts)), removed)
        gone: set[int] = set()  # members disagree on the layout: fall back to index sets
        for gid, m in active:
            gone.update(m.indices(units_of(gid)))
        return self.size - len(gone)


class ParamCounter:
    """Counts parameters remaining after a plan, exactly, for the parameters groups touch."""

    def __init__(self, groups: Iterable[Group], numel: Mapping[str, int],
                 shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.numel = dict(numel)
        self.total = int(sum(self.numel.values()))
        self.dims: dict[str, dict[int, _Dim]] = {}
        self.touches: dict[str, set[str]] = {}  # group id -> parameter names
        self.unknown: set[str] = set()
        self.blocks: dict[str, Any] = {}  # blocks groups: a unit removes whole tensors
        for g in groups:
            if g.kind == "blocks":
                self.blocks[g.id] = g
                self.touches[g.id] = {p for p in g.param_names if p in self.numel}
                continue
            for m in g.params:
                if m.name not in self.numel:
                    self.unknown.add(m.name)
                    continue
                if shapes is not None and m.name in shapes:
                    self._check_shape(g, m, tuple(shapes[m.name]))
                d = self.dims.setdefault(m.name, {}).setdefault(m.dim, _Dim(m.dim_size, []))
                if d.size != m.dim_size:
                    raise PlanError(
                        f"groups disagree on the size of {m.name!r} dim {m.dim}: "
                        f"{d.size} vs {m.dim_size} (group {g.id!r})."
                    )
                if all(gid != g.id or mm != m for gid, mm in d.members):
                    d.members.append((g.id, m))
                self.touches.setdefault(g.id, set()).add(m.name)
        self.rest = {name: self._rest(name) for name in self.dims}

    @staticmethod
    def _check_shape(g: Group, m: Member, shape: tuple) -> None:
        if not 0 <= m.dim < len(shape) or shape[m.dim] != m.dim_size:
            raise PlanError(
                f"group {g.id!r}: member {m.name!r} dim {m.dim} has size {m.dim_size} but the "
                f"parameter's shape is {shape}."
            )

    def _rest(self, name: str) -> int:
        covered = math.prod(d.size for d in self.dims[name].values())
        n = self.numel[name]
        if covered == 0 or n % covered:
            raise PlanError(
                f"numel[{name!r}] = {n} is not a multiple of the sizes of its pruned dims "
                f"({covered}); is numel from the same model as the groups?"
            )
        return n // covered

    def removed_counts(self, counts: Mapping[str, int], units_of: UnitsOf) -> int:
        """Parameters removed when ``counts[gid]`` units of each group go (exact).

        A removed branch (blocks group) removes all of its tensors; width groups shrinking
        those tensors count nothing more for them.
        """
        gone: set[str] = set()
        for gid, n in counts.items():
            if n and gid in self.blocks:
                for u in units_of(gid):
                    gone.update(p for p in self.blocks[gid].unit_params(u) if p in self.numel)
        names = set().union(*(self.touches.get(gid, set()) for gid, n in counts.items()
                              if n and gid not in self.blocks)) - gone
        total = sum(self.numel[name] for name in gone)
        for name in names:
            kept = self.rest[name] * math.prod(d.kept(counts, units_of) for d in self.dims[name].values())
            total += self.numel[name] - kept
        return total

    def removed(self, plan: Mapping[str, Sequence[int]]) -> int:
        """Parameters removed by ``plan`` ``{gid: units}`` (exact)."""
        plan = {gid: sorted(set(int(u) for u in units)) for gid, units in plan.items()}
        return self.removed_counts({gid: len(u) for gid, u in plan.items()}, plan.__getitem__)


def count_params_after(
    groups: Iterable[Group],
    plan: Mapping[str, Sequence[int]],
    param_shapes: Mapping[str, Sequence[int]],
) -> int:
    """Total parameters left in ``param_shapes`` after applying ``plan``, counted exactly.

    A parameter with pruned dims ``d0, d1, ...`` keeps ``prod(kept sizes)`` elements, where a
    dim's kept size combines every group that shrinks it (e.g. heads and head_dim on q_proj);
    member ``m`` of a group removes ``len(m.indices(units))`` indices of its dim.
    """
    numel = {n: math.prod(tuple(s)) for n, s in param_shapes.items()}
    counter = ParamCounter(groups, numel, param_shapes)
    return counter.total - counter.removed(plan)


# --------------------------------------------------------------------------------------------
# Which groups, how far
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Candidate:
    """A group the planner may prune: its units by ascending score and allowed removal counts."""

    index: int
    group: Group
    order: np.ndarray  # units sorted by (score, unit)
    scores: np.ndarray
    steps: list[int]  # allowed numbers of removed units, ascending, steps[0] == 0
    fixed: float | None = None  # per-kind fixed fraction, or None when searched

    def units(self, count: int) -> list[int]:
        return sorted(int(u) for u in self.order[:count])

    def step_at_most(self, count: float) -> int:
        """Largest allowed removal count <= count."""
        i = bisect.bisect_right(self.steps, count + 1e-9) - 1
        return self.steps[max(i, 0)]

    def nearest_step(self, count: float) -> int:
        return min(self.steps, key=lambda s: (abs(s - count), s))

    def chunk_scores(self) -> np.ndarray:
        """Mean score of the units removed by going from step j to step j+1, for every j."""
        cum = np.concatenate([[0.0], np.cumsum(self.scores[self.order])])
        steps = np.asarray(self.steps)
        return (cum[steps[1:]] - cum[steps[:-1]]) / np.diff(steps)


def allowed_removals(size: int, round_to: int, max_ratio: float) -> list[int]:
    """Removal counts that keep a multiple of ``round_to`` (>= round_to, >= 1) within the cap.

    A group smaller than ``round_to`` (or whose only options break the cap) cannot be pruned.
    """
    cap = min(math.floor(max_ratio * size + 1e-9), size - max(round_to, 1))
    steps = {size - k for k in range(round_to, size + 1, round_to) if 0 < size - k <= cap}
    return [0, *sorted(steps)]


def _kind_setting(kind: str, kinds: Mapping[str, Any] | None) -> float | bool:
    """``False`` (off), ``True`` (searched) or a fixed fraction for ``kind``."""
    value = (kinds or {}).get(kind, DEFAULT_KINDS.get(kind, False))
    if value is None or value is True:
        return True
    if value is False:
        return False
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"kinds[{kind!r}] must be a bool, None or a ratio in [0, 1), got {value!r}.") from None
    if not 0.0 <= f < 1.0:
        raise PlanError(f"kinds[{kind!r}] = {f} is outside [0, 1).")
    return False if f == 0.0 else f


def _min_kept(source: Any) -> dict[str, int]:
    from fxprune.passes.experts import min_kept_experts

    return min_kept_experts(source)


def kind_enabled(kind: str, kinds: Mapping[str, Any] | None) -> bool:
    """Whether the planner may prune groups of ``kind`` under ``kinds`` (merged over the defaults)."""
    return _kind_setting(kind, kinds) is not False


def _blocks_kept(groups: Sequence[Group], first: int, last: int) -> set[str]:
    """Blocks among the first/last N of their family (``model.layers.<i>``), by numeric index."""
    from fxprune.passes.depth import block_of

    names = [g.block for g in groups if g.kind != "blocks"]
    names += [block_of(b) for g in groups if g.kind == "blocks" for b in g.branches]
    return edge_blocks(names, first, last)


def round_for(kind: str, round_to: int | Mapping[str, int]) -> int:
    """The ``round_to`` multiple for ``kind`` (an int for every kind, or a per-kind mapping)."""
    r = round_to.get(kind, 1) if isinstance(round_to, Mapping) else round_to
    if not isinstance(r, (int, np.integer)) or r < 1:
        raise PlanError(f"round_to must be a positive integer, got {r!r} for kind {kind!r}.")
    return int(r)


def _candidates(
    groups: Sequence[Group],
    scores: Mapping[str, np.ndarray],
    counter: ParamCounter,
    *,
    kinds: Mapping[str, Any] | None,
    max_group_ratio: float,
    kept_blocks: set[str],
    ignore: Sequence[str],
    round_to: int | Mapping[str, int],
    min_kept: Mapping[str, int] | None = None,
    unscored: Mapping[str, str] | None = None,
) -> tuple[list[_Candidate], dict[str, str]]:
    """The prunable groups, and why every other group is skipped."""
    min_kept = min_kept or {}
    cands: list[_Candidate] = []
    skipped: dict[str, str] = {}
    for i, g in enumerate(groups):
        setting = _kind_setting(g.kind, kinds)
        reason = _skip_reason(g, setting, counter, kept_blocks, ignore)
        if not reason and g.id in (unscored or {}):
            reason = unscored[g.id]
        if reason:
            skipped[g.id] = reason
            continue
        s = _group_scores(g, scores)
        steps = allowed_removals(g.size, round_for(g.kind, round_to), max_group_ratio)
        if g.kind == "blocks":
            s, steps = _block_units(g, s, steps, kept_blocks, ignore, skipped)
        if g.id in min_kept:  # a router picking top-k needs k experts
            steps = [k for k in steps if g.size - k >= min_kept[g.id]]
        if len(steps) == 1:
            skipped[g.id] = f"size {g.size} leaves no removable multiple of round_to within the cap"
            continue
        order = np.lexsort((np.arange(g.size), s))
        fixed = setting if isinstance(setting, float) else None
        cands.append(_Candidate(i, g, order, s, steps, fixed))
    return cands, skipped


def _block_units(g: Any, s: np.ndarray, steps: list[int], kept_blocks: set[str], ignore: Sequence[str],
                 skipped: dict[str, str]) -> tuple[np.ndarray, list[int]]:
    """Branches in kept blocks or with ignored parameters sort last and are never reached."""
    from fxprune.passes.depth import block_of

    held = [u for u, b in enumerate(g.branches)
            if block_of(b) in kept_blocks or any(matches_prefix(p, ignore) for p in b.params)]
    for u in held:
        skipped[f"{g.id}[{u}] {g.branches[u].id}"] = "kept (keep_blocks_first/last or ignore)"
    if not held:
        return s, steps
    s = s.copy()
    s[held] = (s.max() if len(s) else 0.0) + 1.0
    return s, [k for k in steps if k <= g.size - len(held)]


def _skip_reason(g: Group, setting: float | bool, counter: ParamCounter,
                 kept_blocks: set[str], ignore: Sequence[str]) -> str | None:
    if setting is False:
        return f"kind {g.kind!r} is not pruned (enable it with kinds={{{g.kind!r}: True}})"
    if g.block is not None and g.block in kept_blocks:
        return f"block {g.block!r} is kept (keep_blocks_first/last)"
    if g.kind != "blocks" and any(matches_prefix(n, ignore) for n in g.param_names):
        return "a parameter matches `ignore`"
    if g.id not in counter.touches:
        return "no counted parameter members (nothing to save)"
    if g.size < 2:
        return "a single unit cannot be pruned"
    return None


def _group_scores(g: Group, scores: Mapping[str, np.ndarray]) -> np.ndarray:
    if g.id not in scores:
        raise PlanError(f"no scores for group {g.id!r}; score every group you plan to prune.")
    s = np.asarray(scores[g.id], dtype=np.float64)
    if s.shape != (g.size,):
        raise PlanError(f"scores for group {g.id!r} have shape {s.shape}, expected ({g.size},).")
    if not np.all(np.isfinite(s)):
        raise PlanError(f"scores for group {g.id!r} contain NaN/inf.")
    return s


# --------------------------------------------------------------------------------------------
# Allocation strategies
# --------------------------------------------------------------------------------------------


def _plan_from_counts(cands: Sequence[_Candidate], counts: Mapping[int, int]) -> dict[str, list[int]]:
    return {c.group.id: c.units(counts[c.index]) for c in cands if counts.get(c.index, 0) > 0}


def _removed_fn(cands: Sequence[_Candidate], counter: ParamCounter) -> Callable[[Mapping[int, int]], int]:
    """``removed(counts by candidate index)``, without materialising unit lists when possible."""
    by_index = {c.index: c for c in cands}
    by_id = {c.group.id: c for c in cands}

    def removed(counts: Mapping[int, int]) -> int:
        named = {by_index[i].group.id: n for i, n in counts.items() if n}
        return counter.removed_counts(named, lambda gid: by_id[gid].units(named[gid]))

    return removed


def _largest_within(n: int, removed_at: Any, target: float) -> int:
    """Largest ``k`` in [0, n] with ``removed_at(k) <= target`` (removed_at is monotone)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if removed_at(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _closer(removed_at: Any, k: int, n: int, target: float) -> int:
    """Take one more step when it lands closer to the target than stopping short."""
    if k < n and removed_at(k + 1) - target < target - removed_at(k):
        return k + 1
    return k


def _uniform(cands: list[_Candidate], fixed: dict[int, int], counter: ParamCounter,
             target: float) -> tuple[dict[int, int], dict[str, Any]]:
    """One fraction for every searched group (bisection), then top-up steps by uniform class.

    A class is every searched group of one kind and size (the MLP of every layer, say): its groups
    always get the same count, so after ``round_to`` every layer of a kind keeps the same size and
    one config (``intermediate_size``, ``num_attention_heads``...) can describe the model.
    """
    searched = [c for c in cands if c.fixed is None]
    fractions = sorted({s / c.group.size for c in searched for s in c.steps})

    def counts_at(i: int) -> dict[int, int]:
        f = fractions[i] if fractions else 0.0
        return {**fixed, **{c.index: c.step_at_most(f * c.group.size) for c in searched}}

    removed = _removed_fn(cands, counter)

    i = _largest_within(len(fractions) - 1, lambda i: removed(counts_at(i)), target) if fractions else 0
    counts = counts_at(i)
    fraction = fractions[i] if fractions else 0.0
    counts = _top_up(uniform_classes(searched), counts, removed, target)
    return counts, {"fraction": fraction}


def uniform_classes(cands: Sequence[_Candidate]) -> list[list[_Candidate]]:
    """Candidates grouped by (kind, size, allowed steps): the groups a uniform plan treats alike."""
    classes: dict[tuple, list[_Candidate]] = {}
    for c in cands:
        classes.setdefault((c.group.kind, c.group.size, tuple(c.steps)), []).append(c)
    return list(classes.values())


def _top_up(classes: Sequence[Sequence[_Candidate]], counts: dict[int, int], removed: Any,
            target: float) -> dict[int, int]:
    """Close the gap left by the shared fraction, whole classes at a time.

    Rounds: in each, every class whose next step still fits under the target takes it (every
    group of the class moves together, or none does), cheapest-to-lose class first (mean score
    of the units the step removes); rounds repeat until no class fits.  So a class with fine
    steps (MLP channels) fills what a coarse one (one KV head in every layer) cannot.  The last
    step may overshoot when that lands closer to the target than stopping short.
    """
    def next_steps(counts: Mapping[int, int]) -> list[tuple[float, int, dict[int, int]]]:
        out = []
        for k, cls in enumerate(classes):
            j = cls[0].steps.index(counts[cls[0].index])
            if j + 1 < len(cls[0].steps):
                cost = float(np.mean([c.chunk_scores()[j] for c in cls]))
                out.append((cost, k, {c.index: c.steps[j + 1] for c in cls}))
        return sorted(out, key=lambda e: e[:2])

    current = removed(counts)
    progressed = True
    while progressed:
        progressed = False
        for _, _, step in next_steps(counts):
            trial = {**counts, **step}
            r = removed(trial)
            if r <= target:
                counts, current, progressed = trial, r, True
    overshoots = [(removed({**counts, **step}), k, step) for _, k, step in next_steps(counts)]
    if overshoots:
        r, _, step = min(overshoots, key=lambda e: e[:2])
        if r - target < target - current:
            counts = {**counts, **step}
    return counts


def _global(cands: list[_Candidate], fixed: dict[int, int], counter: ParamCounter,
            target: float) -> tuple[dict[int, int], dict[str, Any]]:
    """Rank every chunk of units of every searched group by score; take the cheapest prefix."""
    counts, k, threshold = _prefix(cands, fixed, counter, target, {c.index: c.chunk_scores() for c in cands})
    return counts, {"score_threshold": threshold}


def _prefix(cands: list[_Candidate], fixed: dict[int, int], counter: ParamCounter, target: float,
            values: Mapping[int, np.ndarray]) -> tuple[dict[int, int], int, float | None]:
    """Sort every chunk of every searched group by ``values[c.index]`` (one per chunk) and take the
    longest prefix that fits the target (exact accounting).  Returns (counts, k, last value)."""
    searched = [c for c in cands if c.fixed is None]
    # one row per chunk: (value, candidate index, chunk number); a group's chunk values are made
    # non-decreasing so that sorting keeps each group's chunks in order (a prefix is a plan)
    chunk_score = np.concatenate([np.maximum.accumulate(values[c.index]) for c in searched])
    chunk_group = np.concatenate([np.full(len(c.steps) - 1, c.index) for c in searched])
    chunk_num = np.concatenate([np.arange(len(c.steps) - 1) for c in searched])
    order = np.lexsort((chunk_num, chunk_group, chunk_score))
    chunk_score, chunk_group = chunk_score[order], chunk_group[order].astype(np.int64)
    steps_of = {c.index: c.steps for c in cands}
    removed = _removed_fn(cands, counter)

    def counts_at(k: int) -> dict[int, int]:
        taken = np.bincount(chunk_group[:k])
        counts = dict(fixed)
        for idx in np.nonzero(taken)[0]:
            counts[int(idx)] = steps_of[int(idx)][int(taken[idx])]
        return counts

    def removed_at(k: int) -> int:
        return removed(counts_at(k))

    k = _largest_within(len(chunk_group), removed_at, target)
    k = _closer(removed_at, k, len(chunk_group), target)
    threshold = float(chunk_score[k - 1]) if k else None
    return counts_at(k), k, threshold


def _chunk_costs(c: _Candidate) -> np.ndarray:
    """Summed cost of the units each chunk (step j -> j+1) removes."""
    cum = np.concatenate([[0.0], np.cumsum(c.scores[c.order])])
    steps = np.asarray(c.steps)
    return cum[steps[1:]] - cum[steps[:-1]]


def _unit_params(c: _Candidate, counter: ParamCounter) -> float:
    """Parameters one unit of ``c`` removes in isolation."""
    return float(sum(counter.numel[m.name] // m.dim_size * m.unit_width
                     for m in c.group.params if m.name in counter.numel)) or 1.0


def _cost(cands: list[_Candidate], fixed: dict[int, int], counter: ParamCounter,
          target: float) -> tuple[dict[int, int], dict[str, Any]]:
    """Take the chunks with the lowest cost per removed parameter, across every group and kind.

    Scores are removal costs (``Scores.raw`` of a curvature criterion: per-token loss increase).
    A chunk's parameters are first counted in isolation; since groups share tensors (hidden with
    every layer, heads with head_dim), the per-unit parameter counts are then re-measured at the
    plan found (the exact marginal saving of one more step of each group, all others applied)
    and the ranking is redone, twice.
    """
    removed = _removed_fn(cands, counter)
    per_unit = {c.index: _unit_params(c, counter) for c in cands}
    counts: dict[int, int] = dict(fixed)
    threshold = None
    rounds = 0
    for rounds in range(1, 4):
        values = {c.index: _chunk_costs(c) / (np.diff(np.asarray(c.steps)) * per_unit[c.index]) for c in cands}
        new, _, threshold = _prefix(cands, fixed, counter, target, values)
        if new == counts and rounds > 1:
            break
        counts = new
        if rounds == 3:
            break
        base = removed(counts)
        for c in cands:
            if c.fixed is not None:
                continue
            j = c.steps.index(counts.get(c.index, 0))
            if j + 1 < len(c.steps):
                step = c.steps[j + 1] - c.steps[j]
                more = removed({**counts, c.index: c.steps[j + 1]}) - base
                per_unit[c.index] = max(more / step, 1.0)
    return counts, {"cost_per_param_threshold": threshold, "cost_rounds": rounds}


_STRATEGIES = {"uniform": _uniform, "global": _global, "cost": _cost}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@fxpass("make_plan")
def make_plan(
    groups: Any,
    scores: Mapping[str, np.ndarray],
    ratio: float,
    *,
    numel: Mapping[str, int] | None = None,
    allocation: str = "uniform",
    max_group_ratio: float = 0.9,
    keep_blocks_first: int = 0,
    keep_blocks_last: int = 0,
    ignore: Sequence[str] | str = (),
    round_to: int | Mapping[str, int] = 1,
    kinds: Mapping[str, Any] | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Choose units to remove so that about ``ratio`` of all parameters go.

    Args:
        groups: the :class:`~fxprune.passes.analysis.Analysis` (or a sequence of its groups).
        scores: ``{group_id: per-unit scores}`` from :func:`fxprune.passes.scoring.score`
            (higher = keep).  Needed for every group that may be pruned; for ``global`` they
            must be comparable across groups (the scoring pass normalizes them by default).
        ratio: fraction in [0, 1) of the model's *total* parameters (``sum(numel.values())``,
            one entry per distinct tensor) to remove.
        numel: parameter FQN -> number of elements, one entry per distinct tensor (default: read
            from the model the Analysis was traced from).
        allocation: ``"uniform"`` (the same fraction of every searched group, like LLM-Pruner;
            bisected to hit the target, then topped up by whole classes -- every group of one
            kind and size -- whose next units score lowest, so every layer of a kind keeps one size),
            ``"global"`` (the lowest-scoring units anywhere, in chunks of ``round_to``, until the
            target) or ``"cost"`` (the chunks with the lowest *removal cost per removed parameter*
            anywhere, on the raw costs of a curvature criterion (``Scores.raw``), searching every
            width kind by default, see :data:`COST_KINDS`; ``kinds`` still overrides).
        max_group_ratio: never remove more than this fraction of any group.
        keep_blocks_first / keep_blocks_last: leave groups in the first / last N blocks of each
            block family (e.g. ``model.layers.<i>``, ordered by ``i``) untouched.
        ignore: module/parameter prefixes (matched on ``.`` boundaries); a group with any
            parameter member under one of them is not pruned.
        round_to: kept size of every pruned group is a multiple of this (int, or per kind);
            groups are never pruned below ``round_to`` units nor emptied.
        kinds: per-kind switches and ratios merged over :data:`DEFAULT_KINDS`: ``False``/``0``
            disables a kind, ``True``/``None`` lets the allocation decide, a float in (0, 1)
            removes that fraction of every group of the kind (lowest scores first) and the
            searched kinds fill the rest of the budget.

    Returns:
        A :class:`Plan` ``{group_id: sorted units}``; ``plan.info`` is a dict with ``allocation``,
        ``target_ratio``, ``achieved_ratio``, ``total_params``, ``target_params``,
        ``removed_params`` (exact, see :func:`count_params_after`), ``removed_units``
        ``{group_id: count}``, ``skipped`` ``{group_id: reason}``, ``max_step_params`` (the
        largest single rounding step, i.e. the precision the target can be hit with) and
        strategy details (``fraction`` for uniform, ``score_threshold`` for global).

    Raises:
        PlanError: ratio outside [0, 1), unknown allocation, bad kinds/round_to/max_group_ratio,
            missing or malformed scores, numel inconsistent with the groups.
    """
    _check_args(ratio, allocation, max_group_ratio, kinds)
    kind_notes: dict[str, str] = {}
    unscored = {gid: "the criterion could score none of its members (see the report's costs per member)"
                for gid in getattr(scores, "unscored", ()) or ()}
    if allocation != "uniform":
        unscored.update({gid: f"ranked by weight norm only (the criterion could score none of its members): not "
                              f"comparable with the other groups under allocation={allocation!r}"
                         for gid in getattr(scores, "fallback", ()) or ()})
    if allocation == "cost":
        scores, kinds, kind_notes = _cost_inputs(scores, kinds)
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    source = groups
    groups = _groups_of(groups)
    numel = _numel_of(source, numel, "make_plan")
    counter = ParamCounter(groups, numel)
    kept_blocks = _blocks_kept(groups, keep_blocks_first, keep_blocks_last)
    cands, skipped = _candidates(
        groups, scores, counter, kinds=kinds, max_group_ratio=max_group_ratio,
        kept_blocks=kept_blocks, ignore=ignore, round_to=round_to, min_kept=_min_kept(source), unscored=unscored,
    )
    target = ratio * counter.total
    fixed = {c.index: c.nearest_step(c.fixed * c.group.size) for c in cands if c.fixed is not None}
    fixed_removed = _removed_fn(cands, counter)(fixed)
    if ratio == 0 or not cands:
        counts, details = ({}, {})
    elif fixed_removed >= target:
        warnings.warn(
            f"the fixed per-kind ratios alone remove {fixed_removed / max(counter.total, 1):.3f} "
            f"of the parameters, more than ratio={ratio}; the searched kinds are not pruned.",
            stacklevel=3,
        )
        counts, details = fixed, {}
    else:
        counts, details = _STRATEGIES[allocation](cands, fixed, counter, target)
    plan = _plan_from_counts(cands, counts)
    info = _info(plan, groups, cands, skipped, counter, ratio, target, allocation, details)
    info.update(round_to=dict(round_to) if isinstance(round_to, Mapping) else round_to,
                max_group_ratio=max_group_ratio)
    info["removed_blocks"] = [g.branches[u].id for g in groups if g.kind == "blocks" for u in plan.get(g.id, ())]
    info["by_kind"] = by_kind(plan, groups, counter, getattr(scores, "raw", scores), kind_notes)
    return Plan.of(groups, plan, info)


def make_uniform(
    groups: Any,
    plan: Plan,
    scores: Mapping[str, np.ndarray],
    *,
    numel: Mapping[str, int] | None = None,
    round_to: int | Mapping[str, int] | None = None,
    max_group_ratio: float | None = None,
) -> Plan:
    """The uniform plan nearest to ``plan`` (a global or per-layer one).

    Every class of prunable groups (same kind and size: the MLP of every layer, say) gets the
    class' mean removal count, rounded to an allowed step next to it (the nearest, or the other
    neighbour when that brings the parameter total closer to the plan's), and each group removes
    its lowest-scoring units.  Groups the plan skipped (kept blocks, ``ignore``, disabled kinds) stay untouched.
    Serving stacks that need one config for all layers (vLLM, TGI, llama.cpp converters) take
    the result as a standard checkpoint.  ``round_to``/``max_group_ratio`` default to the ones
    the plan was made with.
    """
    source, groups = groups, _groups_of(groups)
    plan.check_against(groups)
    info = dict(plan.info)
    round_to = info.get("round_to", 1) if round_to is None else round_to
    max_group_ratio = info.get("max_group_ratio", 0.9) if max_group_ratio is None else max_group_ratio
    numel = _numel_of(source, numel, "make_uniform")
    counter = ParamCounter(groups, numel)
    skipped = info.get("skipped", {})
    classes: dict[tuple[str, int], list[Group]] = {}
    for g in groups:
        if g.id not in skipped and g.id in counter.touches and g.size >= 2:
            classes.setdefault((g.kind, g.size), []).append(g)
    # per class: the allowed counts just below and above the mean; start at the nearest, then
    # move single classes to their other neighbour while that brings the total closer to the plan's
    options: dict[tuple[str, int], list[int]] = {}
    for (kind, size), members in classes.items():
        steps = allowed_removals(size, round_for(kind, round_to), max_group_ratio)
        mean = float(np.mean([len(plan.get(g.id, ())) for g in members]))
        near = sorted(steps, key=lambda n: (abs(n - mean), n))[:2]
        options[(kind, size)] = sorted(near, key=lambda n: (abs(n - mean), n))
    orders = {g.id: np.lexsort((np.arange(g.size), _group_scores(g, scores)))
              for members in classes.values() for g in members}

    def plan_for(choice: Mapping[tuple[str, int], int]) -> dict[str, list[int]]:
        return {g.id: sorted(int(u) for u in orders[g.id][:choice[key]])
                for key, members in classes.items() for g in members if choice[key]}

    goal = counter.removed(plan)
    choice = {key: opts[0] for key, opts in options.items()}
    best = abs(counter.removed(plan_for(choice)) - goal)
    improved = True
    while improved:
        improved = False
        for key, opts in options.items():
            for alt in opts:
                if alt == choice[key]:
                    continue
                trial = {**choice, key: alt}
                err = abs(counter.removed(plan_for(trial)) - goal)
                if err < best:
                    choice, best, improved = trial, err, True
    units = plan_for(choice)
    removed = counter.removed(units)
    sizes = {g.id: g.size for g in groups}
    info.update({
        "allocation": f"{info.get('allocation', 'plan')}+uniform",
        "achieved_ratio": removed / counter.total if counter.total else 0.0,
        "removed_params": removed,
        "removed_units": {gid: len(u) for gid, u in units.items()},
        "group_ratio": {gid: len(u) / sizes[gid] for gid, u in units.items()},
        "uniform_from": info.get("allocation"),
    })
    if "by_kind" in info:
        why = {k: v["why"] for k, v in info["by_kind"].items() if "why" in v}
        info["by_kind"] = by_kind(units, groups, counter, getattr(scores, "raw", scores), why)
    return Plan.of(groups, units, info)


def _numel_of(source: Any, numel: Mapping[str, int] | None, caller: str) -> Mapping[str, int]:
    """``numel``, or read from the model an Analysis was traced from."""
    if numel is not None:
        return numel
    module = getattr(getattr(source, "graph", None), "module", None)
    if module is None:
        raise PlanError(f"{caller}(groups, ...) needs numel= (parameter name -> number of elements)")
    from fxprune.util.modules import numel_by_name

    return numel_by_name(module)


def _cost_inputs(scores: Any, kinds: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """Raw costs and the kinds the ``cost`` allocation searches (``COST_KINDS`` under ``kinds``)."""
    notes: dict[str, str] = {}
    merged = dict(COST_KINDS)
    for kind, why in dict(getattr(scores, "uncosted_kinds", {}) or {}).items():
        merged[kind] = False
        notes[kind] = f"not searched by default: {why}"
    merged.update(kinds or {})
    if not getattr(scores, "is_cost", False):
        warnings.warn("allocation='cost' ranks raw scores as removal costs; this criterion's scores are "
                      "not curvature costs (use importance='surgeon' or 'obs')", stacklevel=4)
    return getattr(scores, "raw", scores), merged, notes


def by_kind(plan: Mapping[str, Sequence[int]], groups: Sequence[Group], counter: ParamCounter,
            costs: Mapping[str, np.ndarray], notes: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """What the plan removes per kind: groups, units, parameters (exact, marginal to the other
    kinds) and the summed cost (raw scores) of the removed units, with the cost per parameter."""
    kinds: dict[str, list[str]] = {}
    for g in groups:
        kinds.setdefault(g.kind, []).append(g.id)
    total = counter.removed(plan)
    out: dict[str, dict[str, Any]] = {}
    for kind, ids in kinds.items():
        mine = {gid: plan[gid] for gid in ids if gid in plan}
        rest = {gid: u for gid, u in plan.items() if gid not in mine}
        params = total - counter.removed(rest) if mine else 0
        cost = float(sum(np.asarray(costs[gid], dtype=np.float64)[list(u)].sum() for gid, u in mine.items() if gid in costs))
        entry: dict[str, Any] = {"groups": len(mine), "of_groups": len(ids),
                                 "units": int(sum(len(u) for u in mine.values())), "params": int(params),
                                 "cost": cost, "cost_per_param": cost / params if params else None}
        if notes and kind in notes:
            entry["why"] = notes[kind]
        out[kind] = entry
    return out


def _max_step_params(cands: Sequence[_Candidate], counter: ParamCounter, allocation: str = "global") -> int:
    """Upper bound on the parameters one rounding step removes: the precision of the target.

    A unit's cost in isolation (``Group.params_per_unit``) bounds its marginal cost when other
    groups shrink the same tensors, so ``cost * largest chunk`` bounds every step.  A uniform plan
    steps a whole class (every layer of a kind) at once, so its step is the class' sum.
    """
    def step(c: _Candidate) -> int:
        chunk = max(b - a for a, b in zip(c.steps, c.steps[1:]))
        if c.group.kind == "blocks":
            per_branch = [sum(counter.numel.get(p, 0) for p in b.params) for b in c.group.branches]
            return max(per_branch, default=0) * chunk
        known = [m for m in c.group.params if m.name in counter.numel]
        return sum(counter.numel[m.name] // m.dim_size * m.unit_width for m in known) * chunk

    if allocation == "uniform":
        return max((sum(step(c) for c in cls) for cls in uniform_classes(cands)), default=0)
    return max((step(c) for c in cands), default=0)


def _check_args(ratio: float, allocation: str, max_group_ratio: float,
                kinds: Mapping[str, Any] | None) -> None:
    if not isinstance(ratio, (int, float, np.floating)) or not math.isfinite(ratio) or not 0 <= ratio < 1:
        raise PlanError(
            f"ratio must be a fraction of the parameters in [0, 1), got {ratio!r} "
            "(e.g. 0.2 removes 20% of the parameters)."
        )
    if allocation not in _STRATEGIES:
        raise PlanError(f"unknown allocation {allocation!r}; choose one of {list(_STRATEGIES)}.")
    if not 0 < max_group_ratio <= 1:
        raise PlanError(f"max_group_ratio must be in (0, 1], got {max_group_ratio!r}.")
    for kind in kinds or {}:
        _kind_setting(kind, kinds)  # validates the value


def _info(plan: Mapping[str, Sequence[int]], groups: Sequence[Group], cands: Sequence[_Candidate],
          skipped: dict[str, str], counter: ParamCounter, ratio: float, target: float,
          allocation: str, details: dict[str, Any]) -> dict[str, Any]:
    removed = counter.removed(plan)
    total = counter.total
    max_step = _max_step_params(cands, counter, allocation)
    if target and removed < target - max(max_step, 1):
        warnings.warn(
            f"could only reach {removed / total:.4f} of the parameters for ratio={ratio} "
            "(groups capped by max_group_ratio/round_to, or too few prunable kinds).",
            stacklevel=4,
        )
    sizes = {g.id: g.size for g in groups}
    return {
        "allocation": allocation,
        "target_ratio": float(ratio),
        "achieved_ratio": removed / total if total else 0.0,
        "total_params": total,
        "target_params": int(round(target)),
        "removed_params": removed,
        "removed_units": {gid: len(u) for gid, u in plan.items()},
        "group_ratio": {gid: len(u) / sizes[gid] for gid, u in plan.items()},
        "skipped": skipped,
        "max_step_params": max_step,
        "unknown_params": sorted(counter.unknown),
        **details,
    }
