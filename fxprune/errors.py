"""Every error fxprune raises, in one place.

Each error carries a message a user can act on without a traceback, naming the file, parameter,
group or op involved, and an ``exit_code`` the CLI returns:

* 2: bad input (an argument, a path, a file's contents, a plan) -- fix the command line;
* 3: the model could not be traced;
* 1: anything else fxprune refused to do (a failed verification, an export failure...);
* 130: interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_CAPTURE = 3
EXIT_INTERRUPTED = 130


class FxpruneError(Exception):
    """Base class: every error fxprune raises on bad input derives from it."""

    exit_code = EXIT_ERROR


class BadInputError(FxpruneError, ValueError):
    """An argument, path or file the user gave is unusable."""

    exit_code = EXIT_BAD_INPUT


class CaptureError(FxpruneError):
    """The model could not be traced with torch.export."""

    exit_code = EXIT_CAPTURE


class AnalysisError(FxpruneError):
    """The dependency analysis met something it cannot handle safely."""


class PlanError(BadInputError):
    """A pruning plan or ratio is invalid."""


class VerificationError(FxpruneError):
    """A pruned model does not match the original with the removed units zeroed."""


class ScoringError(FxpruneError):
    """Scoring failed, e.g. on NaN/inf losses or gradients (the message names the parameter)."""


class DataError(BadInputError):
    """Calibration or training data is missing or malformed (the message names the file)."""


class ModelLoadError(BadInputError):
    """A model directory or checkpoint cannot be loaded (the message names the file)."""


class OutputExistsError(BadInputError, FileExistsError):
    """An output path exists (or another run is writing it) and overwrite was not requested."""


class OutputPermissionError(BadInputError, PermissionError):
    """An output path cannot be written (a read-only parent directory, say)."""


class UnsafeOutputError(OutputExistsError):
    """An output path is, contains, or lies inside an input: fxprune never writes over its inputs.

    A kind of :class:`OutputExistsError` (code that handles "the output exists" refuses it too),
    but ``overwrite=True`` does not lift it.
    """


class RecoveryError(FxpruneError):
    """Recovery cannot run with these arguments, or training diverged."""


class ExportError(FxpruneError):
    """A model could not be exported to a deployment target, or its runtime is missing."""


class BadWeightsError(ModelLoadError, ScoringError):
    """A model's weights hold NaN or infinite values (the message names the parameter); raised by
    scoring too, so it is also a :class:`ScoringError`."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; nothing was published.

    A ``KeyboardInterrupt``, not an ``Exception``: the ``except Exception`` blocks in fxprune,
    torch and transformers (which turn a failing step into a clearer error) must never swallow
    a stop request.  The CLI raises it from its signal handlers and exits with 130.
    """

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signum: int | None = None) -> None:
        import signal

        self.signum = signum
        name = signal.Signals(signum).name if signum is not None else "SIGINT"
        super().__init__(f"interrupted by {name}")
