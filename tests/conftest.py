"""Shared fixtures: traced and analysed zoo models, cached per session (tracing is the slow part)."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxprune  # noqa: E402
from tests import zoo  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention


@functools.lru_cache(maxsize=None)
def traced(name: str):
    """(model, graph, groups) for a zoo model; the model is never modified by fxprune."""
    zm = zoo.ZOO[name]
    model = zm.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = fxprune.trace(model, kwargs=zm.make_inputs(2, 8))
        groups = fxprune.analyze(graph)
    return model, graph, groups


EXPORTABLE = [k for k, v in zoo.ZOO.items() if getattr(v, "exportable", True)]


@pytest.fixture
def tiny_llama():
    return traced("llama_gqa")
