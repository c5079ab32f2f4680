"""Errors fxprune raises.  Each carries a message a user can act on without a traceback."""


class FxpruneError(Exception):
    """Base class: every error fxprune raises on bad input derives from it."""


class CaptureError(FxpruneError):
    """The model could not be traced with torch.export."""


class AnalysisError(FxpruneError):
    """The dependency analysis met something it cannot handle safely."""


class PlanError(FxpruneError, ValueError):
    """A pruning plan or ratio is invalid."""


class VerificationError(FxpruneError):
    """A pruned model does not match the original with the removed units zeroed."""


class ScoringError(FxpruneError):
    """Scoring failed, e.g. on NaN/inf losses or gradients."""


class DataError(FxpruneError, ValueError):
    """Calibration or training data is missing or malformed."""


class OutputExistsError(FxpruneError, FileExistsError):
    """An output path exists and overwrite was not requested."""
