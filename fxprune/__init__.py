"""fxprune: structured pruning as compiler passes over torch.export graphs.

    graph  = fxprune.trace(model, kwargs=inputs)      # capture
    groups = fxprune.analyze(graph)                   # coupled dependency groups
    pruned = fxprune.rewrite(model, graph, plan)      # smaller module, verified
"""

from fxprune.errors import (
    AnalysisError,
    CaptureError,
    DataError,
    FxpruneError,
    OutputExistsError,
    PlanError,
    ScoringError,
    VerificationError,
)
from fxprune.graph import Group, Member, PrunableGraph
from fxprune.passes.analysis import analyze
from fxprune.passes.capture import meta_model, trace

__version__ = "0.1.0"

__all__ = [
    "AnalysisError", "CaptureError", "DataError", "FxpruneError", "OutputExistsError", "PlanError",
    "ScoringError", "VerificationError", "Group", "Member", "PrunableGraph", "analyze",
    "meta_model", "trace",
]

from fxprune.passes.rewrite import rewrite, rewrite_graph, verify, zeroed_copy  # noqa: E402

__all__ += ["rewrite", "rewrite_graph", "verify", "zeroed_copy"]

from fxprune.io import load, save  # noqa: E402

__all__ += ["load", "save"]

from fxprune.api import PruneReport, PruneResult, count_flops, prune  # noqa: E402
from fxprune.calib import load_calibration  # noqa: E402
from fxprune.passes.plan import count_params_after, make_plan  # noqa: E402
from fxprune.passes.scoring import score, score_with_stats  # noqa: E402

__all__ += [
    "PruneReport", "PruneResult", "count_flops", "prune", "load_calibration", "count_params_after",
    "make_plan", "score", "score_with_stats",
]

from fxprune.passes.export import export_onnx  # noqa: E402
from fxprune.runtime import benchmark_latency, onnx_generate  # noqa: E402
from fxprune.passes.recovery import RecoveryResult, recover  # noqa: E402

__all__ += ["benchmark_latency", "export_onnx", "onnx_generate", "RecoveryResult", "recover"]
