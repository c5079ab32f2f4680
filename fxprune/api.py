"""The one-call API: ``fxprune.prune(model, ratio)`` runs every pass in order.

    capture -> analyse -> score -> plan -> update -> rewrite (+verify)

Each step is also a public function (``trace``, ``analyze``, ``score``, ``make_plan``,
``rewrite``) for users who want to stop, inspect or replace one.  ``prune`` also accepts an
already traced ``PrunableGraph`` (its ``module`` is the model that gets pruned).

``shots=N`` runs that composition N times on a linear schedule to the target (The LLM Surgeon's
multi-shot), re-tracing the pruned model and re-gathering its statistics every shot; every shot
is verified like a single prune, and an optional short LoRA run (rank 8, merged) follows each.

Defaults (see :data:`DEFAULT_IMPORTANCE`): with calibration data, the curvature criterion with
its weight update, planned by removal cost per parameter across every width kind.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from fxprune.calib import load_calibration
from fxprune.errors import DataError, PlanError, ScoringError
from fxprune.graph import PrunableGraph
from fxprune.passes.analysis import Analysis, analyze
from fxprune.passes.block_scoring import BLOCK_IMPORTANCE, score_blocks
from fxprune.passes.capture import as_keyword_inputs, split_example_inputs, trace
from fxprune.passes.experts import EXPERT_IMPORTANCE, score_experts
from fxprune.passes.plan import DEFAULT_KINDS, Plan, kind_enabled, make_plan, make_uniform
from fxprune.passes.rewrite import RewriteResult, describable_kinds, rewrite
from fxprune.passes.scoring import IMPORTANCE, Scores, score
from fxprune.passes.update import UPDATES, WeightUpdate, update
from fxprune.util.hf import config_of, default_example_inputs
from fxprune.util.modules import count_params, numel_by_name, resolve_device


LOADS_WITH_TEXT = {
    "transformers": "the config describes the pruned model: plain from_pretrained / pipeline / SentenceTransformer load it",
    "trust_remote_code": "layers differ in width: the saved config carries per-layer shapes and a modeling file; "
                         "load with trust_remote_code=True or fxprune.load (prune with uniform=True / --uniform "
                         "for a standard config)",
    "fxprune": "not a transformers model: load it with fxprune.load",
    "onnx": "a rewritten GraphModule: export it with fxprune.export_onnx (it cannot be saved as a checkpoint)",
}
"""What each ``PruneReport.loads_with`` value means for the user (the CLI and model card say it)."""

DEVICE_MULTIPLE = {"cpu": 8, "cuda": 64}
"""Default ``round_to`` per device: kept widths are multiples of this many elements.

CPU GEMM kernels (MLAS in ONNX Runtime, oneDNN/MKL in PyTorch) work on panels of 8 (AVX2) or 16
(AVX-512) fp32 lanes; a width that is not a multiple of 8 leaves a remainder handled by a slower
edge kernel in every matmul.  CUDA tensor cores take fp16/bf16 tiles in multiples of 8 and
cuBLAS/cutlass pick their fastest tile shapes (64/128) only when the dims divide them, so an
odd width runs the whole GEMM at a smaller tile.  MoE kernels (grouped_mm) also require 16-byte
aligned strides, which 8 fp32 or fp16 elements guarantee.
"""


WHOLE_UNIT_KINDS = ("blocks", "experts")
"""Kinds whose units are whole structures (residual branches, experts): removed one at a time,
whatever the device (their widths do not change)."""


def device_round_to(analysis: Any, device: str | torch.device = "auto") -> dict[str, int]:
    """Per-kind ``round_to`` so that every kept width is a multiple of :data:`DEVICE_MULTIPLE`.

    A unit of a kind covers ``w`` elements (1 for MLP channels, ``head_dim`` for heads), so the
    kind rounds to ``multiple / gcd(multiple, w)`` units: 8 channels on CPU, but 1 head of 64.
    """
    multiple = DEVICE_MULTIPLE.get(resolve_device(device).type, DEVICE_MULTIPLE["cpu"])
    widths: dict[str, int] = {}
    for g in analysis.groups:
        if g.kind in WHOLE_UNIT_KINDS:
            continue
        w = 0
        for m in g.params:
            w = math.gcd(w, m.unit_width)
        widths[g.kind] = math.gcd(widths.get(g.kind, 0), w or 1)
    out = {kind: multiple // math.gcd(multiple, w) for kind, w in sorted(widths.items())}
    return {**out, **{kind: 1 for kind in WHOLE_UNIT_KINDS if any(g.kind == kind for g in analysis.groups)}}

_log = logging.getLogger("fxprune")


DEFAULT_IMPORTANCE = "surgeon"
"""The criterion ``prune`` uses when none is given for a model with a loss (an HF model taking
``labels``, or a ``loss_fn``), with its update and the ``cost`` allocation; see
:func:`default_importance`."""


def default_importance(model: Any, loss_fn: Any, calib: Any) -> str:
    """``surgeon`` when there is a loss to take the Fisher of (``loss_fn``, or a forward taking
    ``labels``); ``obs`` (forward only) for models without one (encoders: on all-MiniLM-L6-v2 at
    20%, cosine 0.884 against 0.813 for surgeon on the output-norm fallback loss); ``l2`` without
    calibration data."""
    if calib is None:
        return "l2"
    from fxprune.util.modules import forward_params

    try:
        takes_labels = "labels" in forward_params(model)
    except Exception:  # noqa: BLE001 - a module whose forward cannot be inspected
        takes_labels = False
    return DEFAULT_IMPORTANCE if loss_fn is not None or takes_labels else "obs"

AUTO_SHOT_STEP = 0.2
"""``shots="auto"``: one shot per this much of the parameters removed, for curvature criteria
(on the benchmark LM, 50% in 3 shots: perplexity 26.7 against 64.5 in one shot)."""


def auto_shots(ratio: float, importance: str | None, calib: Any, model: Any = None, loss_fn: Any = None) -> int:
    """The number of shots ``shots="auto"`` means: ``ceil(ratio / AUTO_SHOT_STEP)`` for a criterion
    measured to gain from re-gathered statistics (``Importance.multi_shot``: surgeon) with
    calibration data, else 1."""
    crit = IMPORTANCE.get(importance or default_importance(model, loss_fn, calib))
    if calib is None or crit is None or not getattr(crit, "multi_shot", False):
        return 1
    return max(1, math.ceil(float(ratio) / AUTO_SHOT_STEP - 1e-9))


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
    removed_blocks: list[str] = dataclasses.field(default_factory=list)  # residual branches removed
    update: str = "none"
    by_kind: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    shots: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    round_to: Any = 1  # the multiple per kind the plan kept sizes at
    config: str = "none"  # "standard": the HF config describes the model; "per-layer"; "none": no HF config

    @property
    def loads_with(self) -> str:
        """What a saved checkpoint of this model needs: ``transformers`` (plain from_pretrained),
        ``trust_remote_code`` (per-layer shapes and a modeling file; or fxprune.load) or ``fxprune``."""
        if self.returned != "module":
            return "onnx"
        return {"standard": "transformers", "per-layer": "trust_remote_code"}.get(self.config, "fxprune")

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

    def table(self, timings: bool = True) -> str:
        """The printed summary; ``timings=False`` for files, which must not vary run to run."""
        rows = self.headline()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        kinds = collections.Counter(g["kind"] for g in self.groups if g["removed"])
        lines.append(
            f"pruned groups: {sum(kinds.values())} ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
            f"importance={self.importance}, allocation={self.allocation}, update={self.update}"
            + (f", shots={len(self.shots)}" if len(self.shots) > 1 else "")
        )
        if self.removed_blocks:
            lines.append(f"removed blocks ({len(self.removed_blocks)}): {', '.join(self.removed_blocks)}")
        lines.extend(kind_lines(self.by_kind))
        lines.append(f"verification: {self.verification}; returned: {self.returned}")
        lines.append("checkpoint: " + LOADS_WITH_TEXT[self.loads_with])
        if timings:
            lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self, timings: bool = True) -> dict[str, Any]:
        """Everything as plain data; ``timings=False`` leaves out what varies run to run."""
        d = dataclasses.asdict(self)
        if not timings:
            d.pop("timings")
            d["shots"] = [{k: v for k, v in s.items() if k != "timings"} for s in d.get("shots") or []]
        d["ratio_achieved"] = self.ratio_achieved
        d["flop_ratio"] = self.flop_ratio
        d["loads_with"] = self.loads_with
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


def kind_lines(by_kind: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per kind: what the plan removed, and its cost per removed parameter (why)."""
    out = []
    for kind, e in sorted(by_kind.items()):
        line = f"  {kind}: {e['units']} units in {e['groups']}/{e['of_groups']} groups, {e['params']:,} params"
        if e.get("cost_per_param") is not None:
            line += f", cost/param {e['cost_per_param']:.3g}"
        if e.get("why"):
            line += f" ({e['why']})"
        out.append(line)
    return out


def prune(
    model_or_graph: torch.nn.Module | PrunableGraph | Analysis,
    ratio: float,
    *,
    shots: int | str = "auto",
    shot_lora_steps: int = 0,
    **kwargs: Any,
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
        shots: prune in this many steps of a linear schedule (shot ``k`` brings the total removed
            to ``ratio * k / shots`` of the *original* parameters), re-tracing the pruned model and
            re-gathering its statistics every shot; each shot is verified like a single prune.
            ``shots=1`` is one-shot; ``"auto"`` (default) is one shot per 20% removed for the
            curvature criteria (:func:`auto_shots`), one shot otherwise and whenever blocks or
            experts are searched (``kinds={"blocks": True}``).  ``max_group_ratio`` and
            fixed ``kinds`` fractions apply per shot.
        shot_lora_steps: when > 0, after every shot that many steps of LoRA (rank 8, lr 1e-4,
            peft) on the calibration batches, merged into the weights before the next shot; the
            adapters are sized to the already pruned layers, so removed structures stay removed
            (the LLM Surgeon's masked LoRA).  Needs a model that returns logits.
        **kwargs: the one-shot options, see :func:`prune_once`.
    """
    check_prune_arguments(ratio=ratio, **{k: kwargs[k] for k in (
        "importance", "allocation", "round_to", "n_samples", "seq_len", "batch_size", "aggregate", "update_method",
        "max_group_ratio") if k in kwargs}, **({} if "importance" in kwargs else {"importance": None}))
    moe_note, upfront, asked_shots = None, {}, shots
    if kwargs.get("kinds") is None:  # the graph decides the default kinds: is it a mixture of experts?
        model_or_graph, kwargs, upfront = _analysed(model_or_graph, kwargs)
        if model_or_graph.experts:
            kwargs["kinds"] = {"experts": True}
            moe_note = (f"mixture of experts: whole experts ({kwargs.get('expert_importance', 'reap')}) are pruned "
                        "next to the width kinds, one shot, uniform allocation; kinds={'experts': False} keeps "
                        "every expert")
    if shots == "auto":
        target = model_or_graph.graph.module if isinstance(model_or_graph, Analysis) else getattr(
            model_or_graph, "module", model_or_graph)
        shots = (auto_shots(ratio, kwargs.get("importance"), kwargs.get("calib"), target, kwargs.get("loss_fn"))
                 if isinstance(ratio, (int, float)) else 1)
        if any(kind_enabled(k, kwargs.get("kinds")) for k in ("blocks", "experts")):
            shots = 1  # the multi-shot gain was measured for width; depth and expert criteria run once
    if not isinstance(shots, int) or shots < 1:
        raise PlanError(f"shots must be a positive integer, got {shots!r}")
    try:
        if shots == 1 and not shot_lora_steps:
            result = prune_once(model_or_graph, ratio, **kwargs)
        else:
            result = _multi_shot(model_or_graph, ratio, shots, shot_lora_steps, kwargs)
    except ScoringError as exc:
        if moe_note is None or "expert" not in str(exc):
            raise
        result, moe_note = _default_experts_fallback(model_or_graph, ratio, asked_shots, shot_lora_steps, kwargs,
                                                     moe_note, exc)
    if not upfront and moe_note is None:
        return result
    rep = result.report
    timings = {**rep.timings, **{k: round(rep.timings.get(k, 0.0) + v, 3) for k, v in upfront.items()}}
    if "total" in timings:
        timings["total"] = round(rep.timings["total"] + sum(upfront.values()), 3)
    notes = ([moe_note] if moe_note else []) + list(rep.notes)
    return dataclasses.replace(result, report=dataclasses.replace(rep, timings=timings, notes=notes))


def _graph_of(model_or_graph: Any, example_inputs: Any, batches: list | None) -> PrunableGraph:
    """The graph to prune: the given one, or ``model_or_graph`` traced on ``example_inputs``
    (default: the first calibration batch, or token ids built from the model config)."""
    if isinstance(model_or_graph, Analysis):
        return model_or_graph.graph
    if isinstance(model_or_graph, PrunableGraph):
        return model_or_graph
    if example_inputs is None:
        return trace(model_or_graph, (), _default_inputs(model_or_graph, batches))
    return trace(model_or_graph, *split_example_inputs(example_inputs))


def _default_experts_fallback(model_or_graph: Any, ratio: float, shots: Any, shot_lora_steps: int, kwargs: dict,
                              note: str, exc: ScoringError) -> tuple[PruneResult, str]:
    """The experts were the default's choice, not the caller's, and their criterion failed: score
    them by routing frequency (REAP needs the router weights applied to the expert outputs), else
    prune the width alone; the result and the note that says which."""
    if kwargs.get("expert_importance", "reap") != "frequency":
        try:
            result = prune(model_or_graph, ratio, shots=1, shot_lora_steps=shot_lora_steps,
                           **{**kwargs, "expert_importance": "frequency"})
            return result, f"{note.replace('(reap)', '(frequency)')} (reap could not score them: {exc})"
        except ScoringError as again:
            exc = again
    result = prune(model_or_graph, ratio, shots=shots, shot_lora_steps=shot_lora_steps,
                   **{**kwargs, "kinds": {"experts": False}})
    return result, f"mixture of experts: the experts are not pruned ({exc})"


def _loaded_calibration(kwargs: Mapping[str, Any]) -> list | None:
    """``kwargs["calib"]`` loaded once into batches (every shot and pass reads the same ones)."""
    if kwargs.get("calib") is None:
        return None
    batches = load_calibration(kwargs["calib"], tokenizer=kwargs.get("tokenizer"),
                               n_samples=kwargs.get("n_samples", 32), seq_len=kwargs.get("seq_len", 128),
                               seed=kwargs.get("seed", 0), batch_size=kwargs.get("batch_size", 1))
    if not batches:
        raise DataError("calibration data is empty")
    return batches


def _analysed(model_or_graph: Any, kwargs: dict) -> tuple[Analysis, dict, dict[str, float]]:
    """``model_or_graph`` traced and analysed as :func:`prune_once` would (the calibration loaded
    once, the example inputs taken from it), for decisions that need the graph before the shots;
    the seconds spent, to add to the report."""
    timings: dict[str, float] = {}
    if isinstance(model_or_graph, Analysis) and tuple(kwargs.get("ignore", ())) == model_or_graph.ignore:
        return model_or_graph, kwargs, timings
    kwargs = dict(kwargs)
    t0 = time.perf_counter()
    kwargs["calib"] = _loaded_calibration(kwargs)
    timings["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = _graph_of(model_or_graph, kwargs.get("example_inputs"), kwargs["calib"])
    timings["capture"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analysis = analyze(graph, ignore=kwargs.get("ignore", ()))
    timings["analyze"] = time.perf_counter() - t0
    return analysis, kwargs, timings


def _multi_shot(model_or_graph: Any, ratio: float, shots: int, lora_steps: int, kwargs: dict) -> PruneResult:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise PlanError(f"ratio must be in [0, 1), got {ratio!r}")
    model = model_or_graph.graph.module if isinstance(model_or_graph, Analysis) else (
        model_or_graph.module if isinstance(model_or_graph, PrunableGraph) else model_or_graph)
    t0 = time.perf_counter()
    kwargs = dict(kwargs)
    kwargs["calib"] = _loaded_calibration(kwargs)  # load once; every shot reads the same batches
    if kwargs.get("example_inputs") is None:
        kwargs["example_inputs"] = _default_inputs(model, kwargs.get("calib"))
    p0 = count_params(model)
    current: Any = model_or_graph
    last: PruneResult | None = None
    flops0: float | None = None
    history: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    notes: list[str] = []
    for k in range(1, shots + 1):
        cur_model = current.graph.module if isinstance(current, Analysis) else (
            current.module if isinstance(current, PrunableGraph) else current)
        cur = count_params(cur_model)
        goal = float(ratio) * k / shots  # fraction of the original removed after this shot
        r_k = max(0.0, 1.0 - (1.0 - goal) * p0 / cur)
        res = prune_once(current, min(r_k, 0.999), **kwargs)
        flops0 = res.report.flops_before if k == 1 else flops0
        entry = {"shot": k, "target_total": goal, "ratio_this_shot": r_k, "params_after": res.report.params_after,
                 "verification": res.report.verification, "returned": res.report.returned,
                 "by_kind": res.report.by_kind, "timings": res.report.timings}
        for name, sec in res.report.timings.items():
            timings[name] = timings.get(name, 0.0) + sec
        notes.extend(f"shot {k}: {n}" for n in res.report.notes)
        if res.report.returned != "module" and k < shots:
            raise PlanError(f"shot {k} returned the rewritten graph, not the model's own class "
                            f"({res.report.notes[-1] if res.report.notes else 'module rewrite failed'}); "
                            "multi-shot needs a module it can trace again (use shots=1)")
        if lora_steps and res.model is not None:
            from fxprune.passes.recovery import shot_lora

            t1 = time.perf_counter()
            lora = shot_lora(res.model, kwargs.get("calib") or [dict(res.graph.example_kwargs)], lora_steps,
                             seed=kwargs.get("seed", 0), device=kwargs.get("device", "auto"))
            res = dataclasses.replace(res, model=lora.model)
            entry["lora"] = {"steps": lora.steps, "loss_before": lora.loss_before, "loss_after": lora.loss_after}
            timings["lora"] = timings.get("lora", 0.0) + time.perf_counter() - t1
        history.append(entry)
        current, last = res.model, res
    assert last is not None
    rep = last.report
    rep = dataclasses.replace(
        rep, params_before=p0, ratio_target=float(ratio), shots=history, notes=notes,
        timings={**{k: round(v, 3) for k, v in timings.items()}, "total": round(time.perf_counter() - t0, 3)},
        flops_before=flops0,
    )
    return dataclasses.replace(last, report=rep)


def prune_once(
    model_or_graph: torch.nn.Module | PrunableGraph | Analysis,
    ratio: float,
    *,
    example_inputs: Any = None,
    calib: Any = None,
    tokenizer: Any = None,
    importance: str | None = None,
    block_importance: str = "shortgpt",
    block_options: Mapping[str, Any] | None = None,
    expert_importance: str = "reap",
    aggregate: str = "sum",
    allocation: str | None = None,
    round_to: int | Mapping[str, int] | str = "auto",
    uniform: bool = False,
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
    update_method: str = "auto",
    importance_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    verify: bool = True,
    progress: bool = True,
    distributed: Any = None,
) -> PruneResult:
    """One shot of :func:`prune`: every pass once (``model_or_graph`` and ``ratio`` as there).

    Args:
        example_inputs: inputs used for tracing and verification, in torch.export's conventions:
            a tuple of positional args, a dict of keyword args, or ``(args, kwargs)`` (default:
            the first calibration batch, or token ids built from the model config).
        calib: calibration data for data-driven criteria: a list of strings (with
            ``tokenizer``), a ``datasets.Dataset``, a local txt/json/jsonl/parquet path, or an
            iterable of ready batches.
        importance: a criterion from ``fxprune.passes.scoring.IMPORTANCE`` (surgeon, obs,
            taylor, taylor-element, taylor-2, l1, l2, activation, flap, random); default
            :data:`DEFAULT_IMPORTANCE` with calibration data, ``l2`` without.
        allocation: ``uniform``, ``global`` or ``cost``; default ``cost`` for the curvature
            criteria (surgeon, obs: cost per removed parameter across every width kind) and
            ``uniform`` for the others.
            With ``allocation="uniform"`` every layer of a kind keeps the same size and default
            kinds that the model's HF config cannot describe (heads of BERT/GPT-2-style
            attentions, whose head width is derived from the head count) are left unpruned with a
            note, so the saved checkpoint loads with plain ``from_pretrained``; name a kind in
            ``kinds`` to prune it anyway.  Other allocations save per-layer shapes and a modeling
            file (``trust_remote_code=True``, or ``fxprune.load``).
        kinds / max_group_ratio / keep_blocks_* / ignore: see ``fxprune.passes.plan.make_plan``.
        round_to: kept sizes are multiples of this (int or per kind); ``"auto"`` (default)
            picks a multiple for the device (:func:`device_round_to`: 8 elements on CPU, 64 on
            CUDA), which GEMM kernels run at full speed.
        uniform: round a non-uniform plan (``allocation="global"``/``"cost"``) to the nearest
            uniform one (:func:`fxprune.passes.plan.make_uniform`) so that one standard config
            describes it.
        block_importance: with ``kinds={"blocks": True}`` (depth), the criterion that scores the
            residual branches, from ``fxprune.passes.block_scoring.BLOCK_IMPORTANCE`` (shortgpt,
            sleb, ppl, taylor+, curvature, random).  Depth alone:
            ``kinds={"blocks": True, "channels": False, "heads": False, "kv_heads": False}``.
            ``block_options`` go to the criterion (``{"steps": 8}``, ``{"per_param": True}`` for SLEB).
        expert_importance: with experts enabled (MoE), the criterion that scores the experts,
            from ``fxprune.passes.experts.EXPERT_IMPORTANCE`` (reap, frequency, random).
            :func:`prune` with no ``kinds`` enables them whenever the graph has routed experts
            (one shot, uniform allocation; ``frequency`` where reap cannot score them);
            ``kinds={"experts": False}`` keeps every expert.
        loss_fn: ``loss_fn(output, batch) -> scalar`` for gradient criteria on models without a
            built-in loss (encoders); HF causal LMs use their LM loss by default.
        update_method: a weight-update method from ``fxprune.passes.update.UPDATES``; ``"auto"``
            (default) uses the criterion's own (surgeon, obs and flap update; the rest none).
        importance_options: options of the criterion (``score(importance_options=...)``).
        distributed: a :class:`fxprune.distributed.DistContext` (``init_distributed()`` under
            torchrun): each rank scores its shard of the calibration batches, the sums are
            all-reduced, rank 0 plans and broadcasts the plan, every rank updates and rewrites.
    """
    if importance is None:
        target = model_or_graph.graph.module if isinstance(model_or_graph, Analysis) else getattr(
            model_or_graph, "module", model_or_graph)
        importance = default_importance(target, loss_fn, calib)
    if allocation is None:
        allocation = "cost" if importance in IMPORTANCE and IMPORTANCE[importance].costs else "uniform"
        if allocation == "cost" and any(kind_enabled(k, kinds) for k in ("blocks", "experts")):
            allocation = "uniform"  # block and expert criteria do not score in the width criterion's loss units
    check_prune_arguments(ratio=ratio, importance=importance, allocation=allocation, round_to=round_to,
                          n_samples=n_samples, seq_len=seq_len, batch_size=batch_size, aggregate=aggregate,
                          update_method=update_method, max_group_ratio=max_group_ratio,
                          block_importance=block_importance, expert_importance=expert_importance)
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
        graph = _graph_of(model_or_graph, example_inputs, batches)
        model = graph.module
    with clock("analyze"):
        if analysis is None or tuple(ignore) != analysis.ignore:
            analysis = analyze(graph, ignore=ignore)
    if IMPORTANCE[importance].needs_grad or IMPORTANCE[importance].needs_inputs:
        if batches is None:
            batches = [_example_batch(graph)]
            notes.append(
                f"importance '{importance}' had no calibration data (calib=...); scored on the example inputs only"
            )
    if distributed is not None and batches is not None:
        batches = distributed.shard(batches)
    with clock("score"):
        scores = score(model, _width_groups(analysis, kinds), batches, importance=importance, aggregate=aggregate,
                       device=device, dtype=dtype, loss_fn=loss_fn, seed=seed, progress=progress,
                       importance_options=importance_options,
                       sync=distributed.reduce_scoring if distributed is not None else None)
        if analysis.blocks and kind_enabled("blocks", kinds):
            depth_batches = batches if batches is not None else [dict(graph.example_kwargs)]
            blocks = score_blocks(model, analysis, depth_batches, importance=block_importance, device=device,
                                  loss_fn=loss_fn, seed=seed, progress=progress, **dict(block_options or {}))
            scores = dataclasses.replace(scores, by_group={**scores.by_group, **blocks.by_group},
                                         raw={**scores.raw, **blocks.raw}, importance=f"{importance}+{block_importance}")
        if analysis.experts and kind_enabled("experts", kinds):
            expert_batches = batches if batches is not None else [dict(graph.example_kwargs)]
            experts = score_experts(model, analysis, expert_batches, importance=expert_importance, seed=seed,
                                    progress=progress)
            scores = dataclasses.replace(scores, by_group={**scores.by_group, **experts.by_group},
                                         raw={**scores.raw, **experts.raw},
                                         importance=f"{scores.importance}+{expert_importance}")
    notes.extend(_member_notes(scores))
    with clock("plan"):
        if isinstance(round_to, str):
            if round_to != "auto":
                raise PlanError(f"round_to must be a positive int, a per-kind mapping or 'auto', got {round_to!r}")
            round_to = device_round_to(analysis, device)
        if allocation == "uniform" or uniform:
            kinds = drop_undescribable_kinds(model, analysis, kinds, round_to, notes)
        numel = numel_by_name(model)
        plan = None
        if distributed is None or distributed.is_main:
            plan = make_plan(analysis, scores, float(ratio), numel=numel, allocation=allocation,
                             max_group_ratio=max_group_ratio, keep_blocks_first=keep_blocks_first,
                             keep_blocks_last=keep_blocks_last, ignore=ignore, round_to=round_to, kinds=kinds)
            if uniform and allocation != "uniform":
                plan = make_uniform(analysis, plan, scores, numel=numel)
        if distributed is not None:
            plan = distributed.broadcast_plan(analysis, plan)
    if update_method == "auto":
        update_method = scores.update_method
        if plan and all(analysis.by_id[g].kind in WHOLE_UNIT_KINDS for g in plan if g in analysis.by_id):
            update_method = "none"  # whole experts or branches alone: no width statistics to update from
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
    report = _report(model, pruned, graph, analysis, plan, scores, float(ratio), scores.importance, allocation,
                     timings, notes, result)
    report = dataclasses.replace(report, update=update_method, by_kind=dict(plan.info.get("by_kind", {})),
                                 round_to=round_to, config=_config_state(pruned, result))
    if report.returned == "graph" and any(r == 1 for r in (round_to.values() if isinstance(round_to, Mapping)
                                                           else [round_to])):
        report.notes.append("kernels with alignment limits (grouped_mm needs 16-byte strides) reject odd widths: "
                            "round_to='auto' keeps widths a multiple of 8")
    return PruneResult(pruned, plan, report, graph, analysis, scores, result, weights)


def _width_groups(analysis: Analysis, kinds: Mapping[str, Any] | None) -> list:
    """The width groups to score: all but those of kinds switched off in ``kinds`` (depth alone
    scores no width group; the ``cost`` allocation searches kinds that are off by default, so
    those are scored); experts have their own criteria."""
    off = {k for k, v in (kinds or {}).items() if v is not None and not v}
    return [g for g in analysis.groups if g.kind != "experts" and g.kind not in off]


def _member_notes(scores: Scores) -> list[str]:
    """How the curvature criteria costed each member, counted by method (the report's 'which used which')."""
    if not scores.member_methods:
        return []
    by: dict[str, list[str]] = collections.defaultdict(list)
    for key, how in scores.member_methods.items():
        by[how].append(key)
    parts = [f"{len(v)} {how}" + (f" (e.g. {v[0]})" if "first order" in how or "not scored" in how else "")
             for how, v in sorted(by.items(), key=lambda kv: -len(kv[1]))]
    return [f"{scores.importance} costs per member: " + "; ".join(parts)]


class _Clock:
    """``with clock("step"):`` adds the step's seconds to ``timings``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _log.info("%s...", name)  # the CLI shows these steps (fxprune.cli, logger "fxprune")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
def drop_undescribable_kinds(model: Any, analysis: Analysis, kinds: Mapping[str, Any] | None, round_to: Any,
                 notes: list[str]) -> Mapping[str, Any] | None:
    """Turn off default kinds the model's HF config cannot describe (kinds the user named stay)."""
    named = set(kinds or {})
    present = sorted({g.kind for g in analysis.groups})
    probe = [k for k in present if k not in named and DEFAULT_KINDS.get(k, False)]
    if not probe or config_of(model) is None:
        return kinds
    off = [k for k, ok in describable_kinds(model, analysis, probe, round_to).items() if not ok]
    if not off:
        return kinds
    cfg = type(config_of(model)).__name__
    notes.append(
        f"not pruned: {', '.join(off)} -- no {cfg} describes them cut (the class derives their width from "
        f"other fields), so the checkpoint would need custom code; name them in kinds= (e.g. "
        f"kinds={{{off[0]!r}: True}}) to prune them anyway (it then loads with trust_remote_code=True)"
    )
    return {**{k: False for k in off}, **dict(kinds or {})}


def _config_state(pruned: Any, result: RewriteResult | None) -> str:
    if config_of(pruned) is None:
        return "none"
    if result is None or result.config_updated:
        return "standard"
    # the modeling file subclasses transformers' own classes; other classes load with fxprune.load
    return "per-layer" if type(pruned).__module__.startswith("transformers.") else "none"
def check_prune_arguments(*, ratio: Any, importance: str | None, allocation: str | None = "uniform",
                          round_to: Any = 1, n_samples: int = 32, seq_len: int = 128, batch_size: int = 1,
                          aggregate: str = "sum", update_method: str = "auto", max_group_ratio: float = 0.9,
                          block_importance: str = "shortgpt", expert_importance: str = "reap") -> None:
    """Every argument of :func:`prune` that can be checked before any work (the CLI calls it too);
    ``importance=None`` / ``allocation=None`` (the defaults chosen from the model) pass."""
    import math

    from fxprune.passes.plan import ALLOCATIONS
    from fxprune.passes.scoring import AGGREGATES

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0.0 <= float(ratio) < 1.0:
        raise PlanError(f"ratio must be a fraction in [0, 1) of the parameters to remove, got {ratio!r}")
    if importance is not None and importance not in IMPORTANCE:
        raise PlanError(f"unknown importance criterion {importance!r}; choose from {sorted(IMPORTANCE)}")
    if allocation is not None and allocation not in ALLOCATIONS:
        raise PlanError(f"unknown allocation {allocation!r}; choose one of {list(ALLOCATIONS)}")
    if aggregate not in AGGREGATES:
        raise PlanError(f"unknown aggregate {aggregate!r}; choose one of {sorted(AGGREGATES)}")
    if update_method != "auto" and update_method not in UPDATES:
        raise PlanError(f"unknown update method {update_method!r}; choose from {sorted(UPDATES)} or 'auto'")
    if block_importance not in BLOCK_IMPORTANCE:
        raise PlanError(f"unknown block importance {block_importance!r}; choose from {sorted(BLOCK_IMPORTANCE)}")
    if expert_importance not in EXPERT_IMPORTANCE:
        raise PlanError(f"unknown expert importance {expert_importance!r}; choose from {sorted(EXPERT_IMPORTANCE)}")
    values = round_to.values() if isinstance(round_to, Mapping) else [] if round_to == "auto" else [round_to]
    for r in values:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise PlanError(f"round_to must be a positive integer (or a dict of them per kind, or 'auto'), "
                            f"got {round_to!r}")
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(max_group_ratio, (int, float)) or not 0.0 < float(max_group_ratio) <= 1.0:
        raise PlanError(f"max_group_ratio must be in (0, 1], got {max_group_ratio!r}")


def _example_batch(graph: PrunableGraph) -> Any:
    """The example inputs as one scoring batch: keyword args, else positional args."""
    kwargs = dict(graph.example_kwargs)
    if not graph.example_args:
        return kwargs
    bound = as_keyword_inputs(graph.module, graph.example_args, kwargs)
    if bound is not None:
        return bound
    if kwargs:
        raise DataError("pass calib=... batches: the example inputs mix *args and keyword inputs")
    return tuple(graph.example_args)


def _default_inputs(model: torch.nn.Module, batches: list | None) -> dict:
    if batches:
        first = batches[0]
        if isinstance(first, Mapping):
            return {k: v for k, v in first.items() if isinstance(v, torch.Tensor) and k != "labels"}
    if getattr(model, "config", None) is None:
        raise DataError("pass example_inputs=... (a dict of tensors for the model's forward)")
    return default_example_inputs(model)


def count_flops(model: Any, inputs: Mapping[str, torch.Tensor], constant_kwargs: Mapping | None = None,
                args: tuple = ()) -> float | None:
    """FLOPs of one forward pass on ``inputs`` (torch's FlopCounterMode), or None if it fails."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = {torch.ops.aten._grouped_mm: _grouped_mm_flops} if hasattr(torch.ops.aten, "_grouped_mm") else {}
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
            model(*args, **inputs, **(constant_kwargs or {}))
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return None


def _grouped_mm_flops(a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, out_shape: Sequence[int] = (),
                      **kwargs: Any) -> int:
    """FLOPs of ``aten._grouped_mm`` (fused MoE experts; torch's counter has no formula for it):
    every output element is a dot product over the contraction width."""
    if len(a_shape) == 2 and len(b_shape) == 2:  # groups split the contraction dim
        return 2 * int(out_shape[-2]) * int(out_shape[-1]) * int(a_shape[-1])
    return 2 * math.prod(int(d) for d in out_shape) * int(a_shape[-1])


def _report(model, pruned, graph, groups, plan, scores, ratio, importance, allocation, timings, notes,
            result: RewriteResult | None) -> PruneReport:
    on_meta = graph.on_meta
    flops_before = flops_after = None
    if not on_meta:
        flops_before = count_flops(model, graph.example_kwargs, graph.constant_kwargs, graph.example_args)
        flops_after = count_flops(pruned, graph.example_kwargs, graph.constant_kwargs, graph.example_args)
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
    for bg in getattr(groups, "blocks", ()):
        removed = list(plan.get(bg.id, []))
        rows.append({
            "id": bg.id, "kind": bg.kind, "block": None, "units": bg.size, "removed": len(removed),
            "exact": bg.exact, "scores": [float(x) for x in scores.get(bg.id, [])], "removed_units": removed,
            "removed_branches": [bg.branches[u].id for u in removed],
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
        removed_blocks=list(plan.info.get("removed_blocks", [])),
    )
