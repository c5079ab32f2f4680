"""Pass infrastructure, in the shape of ``torch.fx.passes.infra``'s ``PassBase``.

Every pass is a typed function from the previous pass' frozen result to its own:

    trace    (nn.Module, example inputs)                 -> PrunableGraph
    analyze  (PrunableGraph)                             -> Analysis
    score    (nn.Module, Analysis, batches)              -> Scores
    make_plan(Analysis, Scores, ratio)                   -> Plan
    update   (nn.Module, Analysis, Plan, stats)          -> WeightUpdate
    rewrite  (nn.Module, Analysis, Plan, WeightUpdate)   -> RewriteResult
    recover  (nn.Module, data)                           -> RecoveryResult
    export   (nn.Module, path, backend)                  -> ExportResult

:func:`fxpass` registers a pass under a name in :data:`PASSES` and wraps it with its contracts:
``requires(*args, **kwargs)`` runs before the pass and rejects inputs it cannot take (a
:class:`~fxprune.errors.BadInputError` naming the argument); ``ensures(result)`` runs after it and
checks what the pass promises (a broken promise is a bug in fxprune, raised as the pass' own
error type).  A new pass is one module in ``fxprune/passes/`` with one decorated function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

PASSES: dict[str, Callable[..., Any]] = {}
"""Every registered pass by name (``trace``, ``analyze``, ``score``, ``make_plan``, ...)."""


def class_registrar(registry: dict[str, type], base: Callable[[], type], decorator: str
                    ) -> Callable[[str], Callable[[type], type]]:
    """A ``@register_x(name)`` class decorator for ``registry``: it checks that the class derives
    from ``base()`` (a thunk, so the base may be defined after the registrar) and sets ``cls.name``."""

    def register(name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, base())):
                raise TypeError(f"@{decorator}({name!r}) needs a {base().__name__} subclass")
            cls.name = name
            registry[name] = cls
            return cls

        return deco

    return register


def check(condition: bool, error: type[Exception], message: str) -> None:
    """Raise ``error(message)`` unless ``condition``: the building block of contracts."""
    if not condition:
        raise error(message)


def fxpass(name: str, *, requires: Callable[..., None] | None = None,
           ensures: Callable[[Any], None] | None = None) -> Callable[[F], F]:
    """Register ``fn`` as pass ``name`` and check ``requires`` / ``ensures`` around each call."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if requires is not None:
                requires(*args, **kwargs)
            result = fn(*args, **kwargs)
            if ensures is not None:
                ensures(result)
            return result

        run.pass_name = name  # type: ignore[attr-defined]
        run.requires = requires  # type: ignore[attr-defined]
        run.ensures = ensures  # type: ignore[attr-defined]
        PASSES[name] = run
        return run  # type: ignore[return-value]

    return deco
