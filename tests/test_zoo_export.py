"""Sanity checks for the model zoo (tests/zoo.py).

* every model builds, runs eagerly at two (batch, seq) sizes and gives finite outputs;
* every exportable model exports with dynamic batch/seq dims (non-strict),
  survives ``run_decompositions({})`` and, run at a different (batch, seq) than
  the traced one, matches eager;
* HF causal LMs can ``.generate()``.

Exporting a HF model takes ~3-10 s on CPU, so only a representative subset
(``FAST_EXPORT``) runs by default; the rest are ``@pytest.mark.slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

from tests import zoo

TRACE = (2, 8)  # (batch, seq) used for export; >= 2 on every dynamic dim
OTHER = (3, 5)  # a different (batch, seq) to run the exported program at

# Exported in the default (fast) run: all hand-written models plus one HF model
# per kind of plumbing (RoPE+GQA decoder, ViT, HF convnet).
FAST_EXPORT = {
    "resnet_tiny",
    "concat_cnn",
    "grouped_cnn",
    "fused_qkv_attn",
    "gqa_sdpa_attn",
    "mlp",
    "torch_mha",
    "llama_gqa",
    "vit",
    "hf_resnet",
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The zoo models are tiny: intra-op threading only adds overhead, and on a
    busy 2-core machine OpenMP spin-waiting makes a forward 100x slower."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _export_params():
    params = []
    for name, zm in zoo.ZOO.items():
        if not zm.exportable:
            continue
        marks = () if name in FAST_EXPORT else (pytest.mark.slow,)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #


def test_registry_well_formed():
    assert len(zoo.ZOO) >= 25
    assert FAST_EXPORT <= set(zoo.ZOO)
    for name, zm in zoo.ZOO.items():
        assert zm.name == name
        assert zm.family in zoo.FAMILIES
        assert zoo.get(name) is zm
        if zm.causal_lm:
            assert zm.family in ("decoder", "moe")
    with pytest.raises(KeyError):
        zoo.get("no_such_model")
    # required coverage
    fams = {zm.family for zm in zoo.ZOO.values()}
    assert fams == set(zoo.FAMILIES)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_inputs(name):
    zm = zoo.get(name)
    a = zm.make_inputs(2, 8)
    b = zm.make_inputs(2, 8)
    c = zm.make_inputs(3, 5)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert isinstance(a[k], torch.Tensor), f"{k} is not a tensor"
        torch.testing.assert_close(a[k], b[k])  # deterministic
    # dynamic spec refers to existing kwargs, and those dims follow (batch, seq)
    for k, dims in zm.dynamic.items():
        assert k in a, k
        for i, d in dims.items():
            assert d in ("batch", "seq")
            assert a[k].shape[i] == {"batch": 2, "seq": 8}[d]
            assert c[k].shape[i] == {"batch": 3, "seq": 5}[d]
    if "input_ids" in a:
        assert int(a["input_ids"].min()) >= 0 and int(a["input_ids"].max()) < zoo.VOCAB
    if "attention_mask" in a:
        assert bool((a["attention_mask"] == 1).all())
    kw = zoo.export_kwargs(zm, 2, 8)
    assert ("use_cache" in kw) == zm.causal_lm


# --------------------------------------------------------------------------- #
# eager
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_eager(name):
    zm = zoo.get(name)
    model = zm.build()
    assert not model.training
    params = list(model.parameters())
    assert params and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    for batch, seq in (TRACE, OTHER):
        with torch.no_grad():
            out = model(**zoo.export_kwargs(zm, batch, seq))
        ts = _tensors(out)
        assert ts, "no tensor outputs"
        for t in ts:
            assert torch.isfinite(t).all(), f"non-finite output at batch={batch} seq={seq}"
            assert t.shape[0] == batch


def test_build_is_seeded():
    zm = zoo.get("llama_gqa")
    a, b = zm.build().state_dict(), zm.build().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", zoo.names(exportable=True))
def test_export_dynamic(name):
    """fxprune.trace's graph (shared with the analysis tests) runs at new shapes like eager."""
    from tests.conftest import traced

    zm = zoo.get(name)
    model, graph, _ = traced(name)
    assert any(n.op == "call_function" for n in graph.exported_program.graph.nodes)
    kw = zm.make_inputs(*OTHER)
    with torch.no_grad():
        ref = _tensors(model(**kw, **graph.constant_kwargs))
        got = _tensors(graph(**kw))
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, z in zoo.ZOO.items() if not z.exportable])
def test_not_exportable_still_fails(name):
    """Models marked exportable=False really fail; if this starts passing, flip the flag."""
    zm = zoo.get(name)
    with pytest.raises(Exception):
        zoo.export_model(zm, decompose=False)


# --------------------------------------------------------------------------- #
# generate
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", zoo.names(causal_lm=True))
def test_generate(name):
    zm = zoo.get(name)
    model = zm.build()
    inputs = zm.make_inputs(2, 5)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out[:, :5], inputs["input_ids"])
    assert int(out.max()) < zoo.VOCAB
