"""fxprune: structured pruning as compiler passes over torch.export graphs.

    graph    = fxprune.trace(model, kwargs=inputs)            # capture  -> PrunableGraph
    analysis = fxprune.analyze(graph)                         # analyse  -> Analysis
    scores   = fxprune.score(model, analysis, batches)        # score    -> Scores
    plan     = fxprune.make_plan(analysis, scores, 0.2)       # plan     -> Plan
    weights  = fxprune.update(model, analysis, plan, scores)  # update   -> WeightUpdate
    result   = fxprune.rewrite(model, analysis, plan, weights)  # rewrite -> RewriteResult
    fxprune.save(result, "out/")

or all at once: ``fxprune.prune(model, 0.2, calib=texts, tokenizer=tok)``.
"""

from fxprune.api import PruneReport, PruneResult, count_flops, prune
from fxprune.calib import load_calibration
from fxprune.errors import (
    AnalysisError,
    BadInputError,
    BadWeightsError,
    CaptureError,
    DataError,
    ExportError,
    FxpruneError,
    Interrupted,
    ModelLoadError,
    OutputExistsError,
    OutputPermissionError,
    PlanError,
    RecoveryError,
    ScoringError,
    UnsafeOutputError,
    VerificationError,
)
from fxprune.graph import FrozenClass, Group, Member, PrunableGraph, Unsupported
from fxprune.io import load, save
from fxprune.passes.analysis import Analysis, analyze
from fxprune.passes.base import PASSES
from fxprune.passes.capture import meta_model, trace
from fxprune.passes.export import export_onnx
from fxprune.passes.plan import Plan, count_params_after, make_plan
from fxprune.passes.recovery import RecoveryResult, recover
from fxprune.passes.rewrite import RewriteResult, rewrite, rewrite_graph, verify, zeroed_copy
from fxprune.passes.scoring import Scores, score
from fxprune.passes.update import WeightUpdate, update
from fxprune.runtime import benchmark_latency, onnx_generate

__version__ = "0.1.0"

__all__ = [
    "PASSES", "Analysis", "AnalysisError", "BadInputError", "BadWeightsError", "CaptureError", "DataError", "ExportError",
    "FrozenClass", "FxpruneError", "Group", "Interrupted", "Member", "ModelLoadError", "OutputExistsError", "OutputPermissionError",
    "Plan", "PlanError", "PrunableGraph", "PruneReport", "PruneResult", "RecoveryError", "RecoveryResult",
    "RewriteResult", "ScoringError", "Scores", "UnsafeOutputError", "Unsupported", "VerificationError",
    "WeightUpdate", "analyze", "benchmark_latency", "count_flops", "count_params_after", "export_onnx",
    "load", "load_calibration", "make_plan", "meta_model", "onnx_generate", "prune", "recover", "rewrite",
    "rewrite_graph", "save", "score", "trace", "update", "verify", "zeroed_copy",
]
