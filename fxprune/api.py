"""The one-call API: ``fxprune.prune(model, ratio)`` runs every pass in order.

    capture -> analyse -> score -> plan -> update -> rewrite (+verify)

Each step is also a public function (``trace``, ``analyze``, ``score``, ``make_plan``,
``rewrite``) for users who want to stop, inspect or replace one.  ``prune`` also accepts an
already traced ``PrunableGraph`` (its ``module`` is the model that gets pruned).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from fxprune.calib import load_calibration
from fxprune.errors import DataError, PlanError
from fxprune.graph import PrunableGraph
from fxprune.passes.analysis import Analysis, analyze
from fxprune.passes.capture import trace
from fxprune.passes.plan import Plan, make_plan
from fxprune.passes.rewrite import RewriteResult, rewrite
from fxprune.passes.scoring import IMPORTANCE, Scores, score
from fxprune.passes.update import WeightUpdate, update
from fxprune.util.hf import default_example_inputs
from fxprune.util.modules import count_params, numel_by_name


@dataclasses.dataclass
class PruneReport:
    """What a prune did, in numbers: the headline table, per-layer kept fractions, timings."""

    params_before: int
    params_after: int
    ratio_target: float
    flops_before: float | None
    flops_after: float | None
    importance: str
    allocation: str
    kept_by_kind_and_block: dict[str, dict[str, float]]
    groups: list[dict[str, Any]]
    timings: dict[str, float]
    verification: str
    returned: str  # "module" (the user's class) or "graph" (the rewritten GraphModule)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ratio_achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def flop_ratio(self) -> float | None:
        if self.flops_before and self.flops_after:
            return self.flops_before / self.flops_after
        return None

    def headline(self) -> list[tuple[str, str, str, str]]:
        rows = [("", "before", "after", "change")]
        rows.append((
            "parameters", f"{self.params_before:,}", f"{self.params_after:,}",
            f"-{self.ratio_achieved:.1%} (target -{self.ratio_target:.1%})",
        ))
        if self.flops_before and self.flops_after:
            rows.append((
                "FLOPs (example input)", f"{self.flops_before:.3g}", f"{self.flops_after:.3g}",
                f"{self.flop_ratio:.2f}x fewer",
            ))
        return rows

    def table(self) -> str:
        rows = self.headline()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        kinds = collections.Counter(g["kind"] for g in self.groups if g["removed"])
        lines.append(
            f"pruned groups: {sum(kinds.values())} ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
            f"importance={self.importance}, allocation={self.allocation}"
        )
        lines.append(f"verification: {self.verification}; returned: {self.returned}")
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio_achieved"] = self.ratio_achieved
        d["flop_ratio"] = self.flop_ratio
        return d

    def __str__(self) -> str:
        return self.table()


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """Everything :func:`prune` made, pass by pass: each field is that pass' own result."""

    model: Any
    plan: Plan
    report: PruneReport
    graph: PrunableGraph
    analysis: Analysis
    scores: Scores
    rewrite: RewriteResult | None
    weights: WeightUpdate


def prune(
    model_or_graph: torch.nn.Module | PrunableGraph | Analysis,
    ratio: float,
    *,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    calib: Any = None,
    tokenizer: Any = None,
    importance: str = "taylor",
    aggregate: str = "sum",
    allocation: str = "uniform",
    round_to: int | Mapping[str, int] = 1,
    kinds: Mapping[str, Any] | None = None,
    max_group_ratio: float = 0.9,
    keep_blocks_first: int = 0,
    keep_blocks_last: int = 0,
    ignore: Sequence[str] = (),
    n_samples: int = 32,
    seq_len: int = 128,
    batch_size: int = 1,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    loss_fn: Any = None,
    update_method: str = "none",
    seed: int = 0,
    verify: bool = True,
    progress: bool = True,
    distributed: Any = None,
) -> PruneResult:
    """Prune ``ratio`` of the model's parameters and return the smaller model with a report.

    The composition of the passes, each of which is public:

        graph    = trace(model, kwargs=example_inputs)
        analysis = analyze(graph, ignore=ignore)
        scores   = score(model, analysis, calib, importance=importance)
        plan     = make_plan(analysis, scores, ratio, ...)
        weights  = update(model, analysis, plan, scores, method=update_method)
        result   = rewrite(model, analysis, plan, weights)

    Args:
        model_or_graph: an ``nn.Module`` (left untouched), a graph from ``fxprune.trace``, or an
            ``Analysis`` from ``fxprune.analyze`` (then neither capture nor analysis runs again).
        ratio: fraction of all parameters to remove, in [0, 1).
        example_inputs: kwargs used for tracing and verification (default: the first
            calibration batch, or token ids built from the model config).
        calib: calibration data for data-driven criteria: a list of strings (with
            ``tokenizer``), a ``datasets.Dataset``, a local txt/json/jsonl/parquet path, or an
            iterable of ready batches.
        importance: a criterion from ``fxprune.passes.scoring.IMPORTANCE``
            (taylor, taylor-element, taylor-2, l1, l2, activation, flap, random).
        allocation / round_to / kinds / max_group_ratio / keep_blocks_* / ignore: see
            ``fxprune.passes.plan.make_plan``.
        loss_fn: ``loss_fn(output, batch) -> scalar`` for gradient criteria on models without a
            built-in loss (encoders); HF causal LMs use their LM loss by default.
        update_method: a weight-update method from ``fxprune.passes.update.UPDATES``.
        distributed: a :class:`fxprune.distributed.DistContext` (``init_distributed()`` under
            torchrun): each rank scores its shard of the calibration batches, the sums are
            all-reduced, rank 0 plans and broadcasts the plan, every rank rewrites.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise PlanError(f"ratio must be in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCE:
        raise PlanError(f"unknown importance criterion {importance!r}; choose from {sorted(IMPORTANCE)}")
    timings: dict[str, float] = {}
    notes: list[str] = []
    clock = _Clock(timings)

    with clock("calibration"):
        batches = None
        if calib is not None:
            batches = load_calibration(calib, tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len,
                                       seed=seed, batch_size=batch_size)
            if not batches:
                raise DataError("calibration data is empty")
    analysis = model_or_graph if isinstance(model_or_graph, Analysis) else None
    with clock("capture"):
        if analysis is not None:
            graph = analysis.graph
        elif isinstance(model_or_graph, PrunableGraph):
            graph = model_or_graph
        else:
            inputs = dict(example_inputs) if example_inputs is not None else _default_inputs(model_or_graph, batches)
            graph = trace(model_or_graph, kwargs=inputs)
        model = graph.module
    with clock("analyze"):
        if analysis is None or tuple(ignore) != analysis.ignore:
            analysis = analyze(graph, ignore=ignore)
    if IMPORTANCE[importance].needs_grad or IMPORTANCE[importance].needs_inputs:
        if batches is None:
            batches = [dict(graph.example_kwargs)]
            notes.append(
                f"importance '{importance}' had no calibration data (calib=...); scored on the example inputs only"
            )
    if distributed is not None and batches is not None:
        batches = distributed.shard(batches)
    with clock("score"):
        scores = score(model, analysis, batches, importance=importance, aggregate=aggregate, device=device,
                       dtype=dtype, loss_fn=loss_fn, seed=seed, progress=progress,
                       sync=distributed.reduce_scoring if distributed is not None else None)
    with clock("plan"):
        plan = None
        if distributed is None or distributed.is_main:
            plan = make_plan(analysis, scores, float(ratio), numel=numel_by_name(model), allocation=allocation,
                             max_group_ratio=max_group_ratio, keep_blocks_first=keep_blocks_first,
                             keep_blocks_last=keep_blocks_last, ignore=ignore, round_to=round_to, kinds=kinds)
        if distributed is not None:
            plan = distributed.broadcast_plan(analysis, plan)
    with clock("update"):
        weights = update(model, analysis, plan, scores, method=update_method)
    with clock("rewrite+verify"):
        result = None
        if plan:
            result = rewrite(model, analysis, plan, weights, verify_outputs=verify)
            pruned = result.model
            notes.extend(result.notes)
        else:
            pruned = model
            notes.append("the plan removes nothing (ratio too small for the group granularity?)")
    report = _report(model, pruned, graph, analysis, plan, scores, float(ratio), importance, allocation,
                     timings, notes, result)
    return PruneResult(pruned, plan, report, graph, analysis, scores, result, weights)


class _Clock:
    """``with clock("step"):`` adds the step's seconds to ``timings``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
def _default_inputs(model: torch.nn.Module, batches: list | None) -> dict:
    if batches:
        first = batches[0]
        if isinstance(first, Mapping):
            return {k: v for k, v in first.items() if isinstance(v, torch.Tensor) and k != "labels"}
    if getattr(model, "config", None) is None:
        raise DataError("pass example_inputs=... (a dict of tensors for the model's forward)")
    return default_example_inputs(model)


def count_flops(model: Any, inputs: Mapping[str, torch.Tensor], constant_kwargs: Mapping | None = None) -> float | None:
    """FLOPs of one forward pass on ``inputs`` (torch's FlopCounterMode), or None if it fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs, **(constant_kwargs or {}))
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return None


def _report(model, pruned, graph, groups, plan, scores, ratio, importance, allocation, timings, notes,
            result: RewriteResult | None) -> PruneReport:
    on_meta = graph.on_meta
    flops_before = flops_after = None
    if not on_meta:
        flops_before = count_flops(model, graph.example_kwargs, graph.constant_kwargs)
        flops_after = count_flops(pruned, graph.example_kwargs, graph.constant_kwargs)
    kept: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    rows = []
    for g in groups:
        removed = len(plan.get(g.id, []))
        kept[g.kind][g.block or "(global)"].append(1.0 - removed / g.size)
        rows.append({
            "id": g.id, "kind": g.kind, "block": g.block, "units": g.size, "removed": removed,
            "exact": g.exact,
            "scores": [float(x) for x in scores.get(g.id, [])],
            "removed_units": list(plan.get(g.id, [])),
        })
    verification = str(result.verification) if result is not None and result.verification is not None else "not run"
    returned = result.returned if result is not None else "module"
    return PruneReport(
        params_before=count_params(model),
        params_after=count_params(pruned),
        ratio_target=ratio,
        flops_before=flops_before,
        flops_after=flops_after,
        importance=importance,
        allocation=allocation,
        kept_by_kind_and_block={k: {b: float(np.mean(v)) for b, v in d.items()} for k, d in kept.items()},
        groups=rows,
        timings={k: round(v, 3) for k, v in timings.items()},
        verification=verification,
        returned=returned,
        notes=notes,
    )
