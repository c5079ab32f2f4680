"""Coverage of newer architectures: the groups a user relies on are found, and stay exact.

MLA heads and low-rank dims (DeepSeek-V2/V3), RoPE-layer head groups through complex RoPE
(Llama4), linear-attention heads (Qwen3-Next), the per-layer input width (Gemma3n), heads of
merged ``[batch * heads]`` attention with a dynamic batch (``nn.MultiheadAttention``, DeBERTa),
widths behind a 1-D pool (Swin); in-place writes through views, complex RoPE and the small ops
follow their functional rules; parameters the trace never reads never form a group alone and the
pruned model still runs on the paths that read them; ``trace`` takes ``forward(*args, **kwargs)``;
the op-coverage report ranks what froze.  Exactness of every new zoo family is checked by
tests/test_rewrite.py::test_exact_groups_match_zeroed_original (they are in the zoo).
"""

from __future__ import annotations

import functools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.passes.atoms import SYMBOLIC, AtomStore
from fxprune.passes.op_rules import einsum_specs
from fxprune.passes.rewrite import compare_outputs, zeroed_copy
from tests import zoo
from tests.conftest import traced
from tests.test_analysis import _by_kind as _kinds
from tests.test_analysis import _member


def _with(groups, name, dim=None):
    """The groups that have parameter ``name`` (along ``dim``) as a member."""
    return [g for g in groups if any(m.name == name and (dim is None or m.dim == dim) for m in g.members)]


def _random_plan(groups, seed=0, exact_only=True):
    rng = random.Random(seed)
    return {g.id: sorted(rng.sample(range(g.size), max(1, g.size // 3))) for g in groups if g.exact or not exact_only}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _analyse(model, *args, **kwargs):
    graph = _quiet(fxprune.trace, model, *args, **kwargs)
    return graph, fxprune.analyze(graph)


# ------------------------------------------------------------------------------------------
# Families: the groups a user relies on
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_mla_exposes_heads_rope_pairs_and_low_rank_dims(name):
    model, _, groups = traced(name)
    cfg = model.config
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    p = "model.layers.0.self_attn."
    assert not groups.unsupported or all("scatter" in u.op for u in groups.unsupported)
    (heads,) = [g for g in _with(groups, p + "kv_b_proj.weight", 0) if g.kind == "heads"]
    assert heads.size == cfg.num_attention_heads and heads.exact
    assert _member(heads, p + "q_b_proj.weight", 0).indices([1]) == list(range(nope + rope, 2 * (nope + rope)))
    assert _member(heads, p + "kv_b_proj.weight", 0).indices([0]) == list(range(nope + v))
    assert _member(heads, p + "o_proj.weight", 1).indices([0]) == list(range(v))
    # the RoPE frequencies pair (2f, 2f+1) of the rope part of q and of the shared rope key
    (pairs,) = [g for g in _with(groups, p + "kv_a_proj_with_mqa.weight", 0) if g.kind == "head_dim"]
    assert pairs.size == rope // 2 and pairs.exact
    assert _member(pairs, p + "q_b_proj.weight").indices([1])[:2] == [nope + 2, nope + 3]
    assert _member(pairs, p + "kv_a_proj_with_mqa.weight").indices([1]) == [cfg.kv_lora_rank + 2, cfg.kv_lora_rank + 3]
    # the q.k head dim without RoPE, and the value head dim
    sizes = {g.size for g in _with(groups, p + "kv_b_proj.weight", 0) if g.kind == "head_dim"}
    assert {nope, v} <= sizes
    # the low ranks of q and kv are prunable (inexact: a norm acts on them)
    assert any(g.size == cfg.q_lora_rank for g in _with(groups, p + "q_a_proj.weight", 0))
    assert any(g.size == cfg.kv_lora_rank for g in _with(groups, p + "kv_b_proj.weight", 1))


def test_mla_heads_prune_into_the_users_class():
    model, graph, groups = traced("deepseek_v2")
    (heads,) = _kinds(groups)["heads"]
    res = _quiet(fxprune.rewrite, model, groups, {heads.id: [1]})
    assert res.returned == "module" and res.verification.exact_checked
    attn = res.model.model.layers[0].self_attn
    assert attn.num_heads == model.config.num_attention_heads - 1
    assert tuple(attn.kv_b_proj.weight.shape) == (3 * (attn.qk_nope_head_dim + attn.v_head_dim), attn.kv_lora_rank)


def test_llama4_rope_layer_keeps_kv_groups_and_rope_pairs():
    model, _, groups = traced("llama4")
    assert not any("complex" in u.op or "polar" in u.op or "view_as" in u.op for u in groups.unsupported)
    kinds = _kinds(groups, "model.layers.0")
    hd = model.config.head_dim
    (kv,) = kinds["kv_heads"]
    assert kv.size == model.config.num_key_value_heads and kv.exact
    assert kinds["head_repeat"] and all(g.exact for g in kinds["head_repeat"])
    (pairs,) = [g for g in kinds["head_dim"] if any(m.name.endswith("k_proj.weight") for m in g.members)]
    assert pairs.size == hd // 2
    k = _member(pairs, "model.layers.0.self_attn.k_proj.weight")
    assert k.indices([0]) == [0, 1, hd, hd + 1]  # complex RoPE rotates adjacent pairs, per kv head


@functools.lru_cache(maxsize=None)
def _static(name):
    """A heavy zoo model traced with static shapes (its dynamic export takes a minute)."""
    zm = zoo.HEAVY[name]
    model = zm.build()
    graph = _quiet(fxprune.trace, model, kwargs=zm.make_inputs(2, 8), dynamic=False)
    return model, graph, fxprune.analyze(graph)


def test_qwen3_next_linear_attention_heads():
    model, graph, groups = _static("qwen3_next")
    cfg = model.config
    assert not groups.unsupported
    p = "model.layers.0.linear_attn."
    kinds = _kinds(_with(groups, p + "in_proj_qkvz.weight", 0))
    (kv,) = kinds["kv_heads"]
    (rep,) = kinds["head_repeat"]
    assert kv.size == cfg.linear_num_key_heads and rep.size == cfg.linear_num_value_heads // cfg.linear_num_key_heads
    assert kv.exact and rep.exact
    assert {p + "in_proj_qkvz.weight", p + "out_proj.weight", p + "A_log", p + "dt_bias"} <= set(kv.param_names)
    plan = {kv.id: [0], rep.id: [1]}
    program = _quiet(fxprune.rewrite_graph, groups, plan)  # the graph alone: no module/config search
    assert fxprune.verify(model, program, plan, groups).exact_checked


def test_gemma3n_per_layer_input_width_and_residual_width():
    model, _, groups = traced("gemma3n")
    cfg = model.config
    assert not groups.unsupported  # torch.multiply, in-place slice writes
    (per_layer,) = _with(groups, "model.layers.0.per_layer_input_gate.weight", 0)
    assert per_layer.size == cfg.hidden_size_per_layer_input
    assert {"model.embed_tokens_per_layer.weight", "model.per_layer_model_projection.weight",
            "model.layers.0.per_layer_projection.weight"} <= set(per_layer.param_names)
    (hidden,) = [g for g in groups if g.kind == "hidden" and g.size == cfg.hidden_size]
    assert "model.layers.0.altup.modality_router.weight" in hidden.param_names


@pytest.mark.parametrize("name, prefix", [("torch_mha", "mha."), ("siglip", "head.attention.")])
def test_multihead_attention_heads_with_a_dynamic_batch(name, prefix):
    model, graph, groups = traced(name)
    assert graph.dynamic_shapes, "traced with a dynamic batch"
    mha = model.get_submodule(prefix[:-1])
    (heads,) = [g for g in _with(groups, prefix + "in_proj_weight", 0) if g.kind == "heads"]
    assert heads.size == mha.num_heads and heads.exact
    e, hd = mha.embed_dim, mha.head_dim
    assert _member(heads, prefix + "in_proj_weight", 0).indices([0]) == [s * e + i for s in range(3) for i in range(hd)]
    assert _member(heads, prefix + "out_proj.weight", 1).indices([0]) == list(range(hd))


def test_deberta_heads_through_merged_batch_and_heads():
    model, _, groups = traced("deberta_v2")
    p = "encoder.layer.0.attention.self."
    (heads,) = _kinds(groups)["heads"]
    assert heads.size == model.config.num_attention_heads and heads.exact
    assert {p + n + ".weight" for n in ("query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj")} \
        <= set(heads.param_names)


class _PoolHead(nn.Module):
    """Linear -> (N, C, L) -> AdaptiveAvgPool1d -> Linear, or the same with .mean over L."""

    def __init__(self, pool: bool):
        super().__init__()
        self.a, self.b, self.pool = nn.Linear(16, 24), nn.Linear(24, 5), pool

    def forward(self, x):
        h = self.a(x).transpose(1, 2)
        h = F.adaptive_avg_pool1d(h, 1).flatten(1) if self.pool else h.mean(-1)
        return self.b(h)


def test_one_d_pool_freezes_only_positions():
    found = []
    for pool in (True, False):
        _, groups = _analyse(_PoolHead(pool).eval(), (torch.randn(2, 6, 16),))
        found.append([(g.size, g.exact) for g in groups])
    assert found[0] == found[1] == [(24, True)]
    model, _, groups = traced("swin")  # the last stage's width sits behind an AdaptiveAvgPool1d
    last = model.config.embed_dim * 2
    assert any(g.size == last for g in _with(groups, "classifier.weight", 1))


# ------------------------------------------------------------------------------------------
# In-place ops, complex RoPE and other small ops, on hand-written models
# ------------------------------------------------------------------------------------------
class _KeyAssembly(nn.Module):
    """MLA-style: a new_empty tensor filled by two in-place slice copies."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(16, 12), nn.Linear(16, 8), nn.Linear(20, 6)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        k = a.new_empty(*a.shape[:-1], 20)
        k[..., :12].copy_(a)
        k[..., 12:].copy_(torch.relu(b))
        return self.o(k)


class _SliceUpdates(nn.Module):
    """``+=`` on a slice, masked_fill_, detach_ and dropout_ in place."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.o = nn.Linear(16, 24), nn.Linear(16, 8), nn.Linear(24, 6)

    def forward(self, x):
        h = self.a(x)
        h[..., :8] += self.g(x)
        h.masked_fill_(x[..., :1] > 5, 0.0)
        F.dropout(h, 0.1, self.training, inplace=True)
        return self.o(torch.relu(h)) + x[..., :6].clone().detach_()


class _Overwrite(nn.Module):
    """A write through a view makes channels 0..3 non-zero whatever fc1 holds: not exact."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(16, 8), nn.Linear(8, 6)

    def forward(self, x):
        h = self.a(x)
        h[..., :4].fill_(1.0)
        return self.o(h) + h.sum(-1, keepdim=True)


class _ComplexRope(nn.Module):
    """2 heads of 8 with complex RoPE: polar, view_as_complex, complex mul, view_as_real, outer."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))

    def forward(self, x):
        b, n, _ = x.shape
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
        cis = torch.polar(torch.ones_like(freqs), freqs)

        def rope(t):
            tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
            return torch.view_as_real(tc * cis[None, :, None, :]).flatten(3)

        q = rope(self.q(x).view(b, n, 2, 8)).transpose(1, 2)
        k = rope(self.k(x).view(b, n, 2, 8)).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 8).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))


class _SmallOps(nn.Module):
    """glu, einsum with an ellipsis and with an implicit output, torch.multiply."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(16, 24), nn.Linear(12, 6), nn.Linear(16, 8), nn.Linear(8, 6)

    def forward(self, x):
        h = F.glu(self.a(x), dim=-1)
        e = torch.einsum("...d,ed->...e", self.c(x), self.d.weight)
        s = torch.einsum("bsd,bsd", x, x)
        return torch.multiply(self.b(h) + e, s)


class _Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(20, 6, 1)

    def forward(self, x):
        y = F.pixel_shuffle(self.c1(x), 2)
        return self.c3(F.pixel_unshuffle(torch.relu(self.c2(y)), 2))


_SEQ = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
_IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls, x, expect", [
    (_KeyAssembly, _SEQ, [(12, True), (8, True)]),
    (_SliceUpdates, _SEQ, [(16, True), (8, True)]),
    (_ComplexRope, _SEQ, [("heads", 2), ("head_dim", 4), ("head_dim", 8)]),
    (_SmallOps, _SEQ, [(12, True), (8, True)]),
    (_Shuffle, _IMG, [(4, True), (5, True)]),
], ids=lambda v: getattr(v, "__name__", None))
def test_ops_follow_their_rules_and_prune_exactly(cls, x, expect):
    torch.manual_seed(0)
    model = cls().eval()
    _, groups = _analyse(model, (x,))
    assert not groups.unsupported and not groups.rule_defects
    got = [(g.kind, g.size) if isinstance(expect[0][0], str) else (g.size, g.exact) for g in groups]
    assert sorted(got, key=str) == sorted(expect, key=str)
    res = _quiet(fxprune.rewrite, model, groups, _random_plan(groups))
    assert res.verification.exact_checked
    with torch.no_grad():  # and at a batch/sequence the trace did not see
        other = x[:1].repeat(3, *([1] * (x.dim() - 1)))
        assert compare_outputs(zeroed_copy(model, groups, res.plan)(other), res.model(other))[0]


class _PaddedChunks(nn.Module):
    """Qwen3-Next's chunking: pad a dynamic sequence to a multiple of 4 and reshape it to chunks
    (sizes with Mod that sympy cannot factor); the 2 heads x 8 around it must stay prunable."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.q(x).view(b, n, 2, 8).transpose(1, 2)
        h = F.pad(h, (0, 0, 0, (4 - n % 4) % 4)).reshape(b, 2, -1, 4, 8)
        return self.o(torch.relu(h).sum(3).transpose(1, 2).reshape(b, -1, 16))


def test_unfactorable_dynamic_reshape_freezes_only_its_middle():
    torch.manual_seed(0)
    model = _PaddedChunks().eval()
    _, groups = _analyse(model, (_SEQ,))
    assert sorted(g.size for g in groups) == [2, 8] and all(g.exact for g in groups)
    res = _quiet(fxprune.rewrite, model, groups, {g.id: [0] for g in groups})
    x = torch.randn(3, 11, 16)  # another batch, and a length that pads differently
    with torch.no_grad():
        assert compare_outputs(zeroed_copy(model, groups, res.plan)(x), res.model(x))[0]


def test_a_write_through_a_view_changes_what_is_exact():
    torch.manual_seed(0)
    model = _Overwrite().eval()
    _, groups = _analyse(model, (_SEQ,))
    by_first_row = {_member(g, "a.weight", 0).indices([0])[0]: g for g in groups}
    assert sorted(by_first_row) == [0, 4]
    assert not by_first_row[0].exact and "sum" in by_first_row[0].inexact_reasons[0]  # rows 0..3: overwritten
    assert by_first_row[4].exact
    plan = {by_first_row[0].id: [0]}
    res = _quiet(fxprune.rewrite, model, groups, plan, verify_outputs=False)
    with torch.no_grad():  # and indeed removing an overwritten channel is not zeroing it
        assert not compare_outputs(zeroed_copy(model, groups, plan)(_SEQ), res.model(_SEQ))[0]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_einsum_specs_match_torch(data):
    letters = "abcdef"
    n_ops = data.draw(st.integers(1, 3))
    specs, shapes = [], []
    sizes = {c: data.draw(st.integers(1, 3)) for c in letters}
    ell = [data.draw(st.integers(1, 3)) for _ in range(2)]
    for _ in range(n_ops):
        spec = data.draw(st.text(letters, min_size=0, max_size=3))
        use_ell = data.draw(st.booleans())
        k = data.draw(st.integers(0, 2)) if use_ell else 0
        shapes.append(tuple(ell[2 - k:]) + tuple(sizes[c] for c in spec))
        specs.append(("..." if use_ell else "") + spec)
    eq = ",".join(specs)
    if data.draw(st.booleans()):
        used = sorted(set("".join(specs).replace(".", "")))
        out = data.draw(st.lists(st.sampled_from(used), unique=True)) if used else []
        eq += "->" + ("..." if any("..." in s for s in specs) else "") + "".join(out)
    tensors = [torch.zeros(s) for s in shapes]
    parsed = einsum_specs(eq, [t.dim() for t in tensors])
    assert parsed is not None
    ops, rhs = parsed
    assert [len(o) for o in ops] == [t.dim() for t in tensors]
    assert len(rhs) == torch.einsum(eq, *tensors).dim()


def test_dynamic_products_factor_and_keep_real_freezes():
    import sympy

    s0 = sympy.Symbol("s0", positive=True, integer=True)
    st_ = AtomStore()
    b, h = st_.new(s0), st_.new(4)
    merged = st_.new(4 * s0)
    assert st_.unify_prod([b, h], [merged])
    assert st_.find(h) in st_.leaves(merged) and st_.freeze_of(h) is None  # [B*H] -> H is prunable
    assert st_.freeze_of(b).reason == SYMBOLIC
    st_.freeze([merged], "graph output")  # a real freeze of the product reaches its static factor
    assert st_.freeze_of(h).reason == "graph output"


# ------------------------------------------------------------------------------------------
# Parameters the trace never reads
# ------------------------------------------------------------------------------------------
def test_dinov2_mask_token_follows_the_hidden_width_and_runs_masked():
    model, _, groups = traced("dinov2")
    assert all(g.param_names != ["dinov2.embeddings.mask_token"] for g in groups)
    (hidden,) = _with(groups, "dinov2.embeddings.mask_token", 1)
    assert "dinov2.embeddings.cls_token" in hidden.param_names
    res = _quiet(fxprune.rewrite, model, groups, {hidden.id: [0, 3, 5]})
    x = zoo.ZOO["dinov2"].make_inputs(3, 0)["pixel_values"]
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        out = res.model(pixel_values=x, bool_masked_pos=mask)  # the path the trace did not take
    assert out.logits.shape == (3, 10) and torch.isfinite(out.logits).all()


def test_wav2vec2_spec_augment_embedding_follows_the_hidden_width_in_train_mode():
    model, _, groups = traced("wav2vec2")
    name = "wav2vec2.masked_spec_embed"
    assert all(g.param_names != [name] for g in groups)
    grown = _with(groups, name, 0)
    assert grown and all("wav2vec2.encoder.layer_norm.weight" in g.param_names for g in grown)
    big = max(grown, key=lambda g: g.size)
    res = _quiet(fxprune.rewrite, model, groups, {big.id: [0, 3, 5]})
    pruned = res.model
    pruned.config.mask_time_prob = 0.6  # spec-augment: masked frames take masked_spec_embed
    pruned.train()
    torch.manual_seed(0)
    out = pruned(input_values=zoo.ZOO["wav2vec2"].make_inputs(3, 0)["input_values"])
    assert torch.isfinite(out.logits).all()
    width = pruned.wav2vec2.encoder.layer_norm.weight.shape[0]
    assert pruned.wav2vec2.masked_spec_embed.shape == (width,) and width < model.config.hidden_size


class _Ambiguous(nn.Module):
    """An unread parameter of size 24 next to two unrelated spaces of size 24: frozen, with them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 24), nn.Linear(24, 24)
        self.c = nn.Linear(24, 5)
        self.spare = nn.Parameter(torch.zeros(24))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_an_ambiguous_unread_parameter_is_frozen_with_its_candidates():
    _, groups = _analyse(_Ambiguous().eval(), (torch.randn(3, 16),))
    assert not _with(groups, "spare")
    assert not _with(groups, "a.weight", 0) and not _with(groups, "b.weight", 0)
    assert "not read by the traced graph" in groups.explain("spare:0")


# ------------------------------------------------------------------------------------------
# trace of forward(*args, **kwargs)
# ------------------------------------------------------------------------------------------
class _Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 24), nn.Linear(24, 6)

    def forward(self, x, bias=None, scale=1.0):
        h = self.b(torch.relu(self.a(x))) * scale
        return h if bias is None else h + bias


@pytest.mark.parametrize("args, kwargs", [
    ((torch.randn(3, 5, 16),), {}),
    ((torch.randn(3, 5, 16),), {"bias": torch.randn(3, 5, 6)}),
    ((), {"x": torch.randn(3, 5, 16), "scale": 2.0}),
])
def test_trace_accepts_a_varargs_wrapper(args, kwargs):
    torch.manual_seed(0)
    model = _Wrapper(_Block()).eval()
    graph, groups = _analyse(model, args, kwargs)
    assert [(g.size, g.exact) for g in groups] == [(24, True)]
    res = _quiet(fxprune.rewrite, model, groups, {groups[0].id: [1, 2]})
    new_args = tuple(a[:2].repeat(2, 2, 1) for a in args)  # batch 6, seq 10: the trace was dynamic
    new_kwargs = {k: (v[:2].repeat(2, 2, 1) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with torch.no_grad():
        ok, _, why = compare_outputs(zeroed_copy(model, groups, res.plan)(*new_args, **new_kwargs),
                                     res.model(*new_args, **new_kwargs))
    assert ok, why


# ------------------------------------------------------------------------------------------
# The op-coverage report
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("fxprune_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.tanh()


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class _Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 24), nn.Linear(24, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.c(torch.relu(self.b(_opaque(self.a(x)))))


def opaque_factory():
    torch.manual_seed(0)
    return _Opaque().eval(), {"x": torch.randn(3, 16)}


def test_coverage_report_ranks_what_froze_by_parameters():
    model, inputs = opaque_factory()
    _, groups = _analyse(model, kwargs=inputs)
    report = groups.coverage()
    assert [r.params for r in report.rows] == sorted((r.params for r in report.rows), reverse=True)
    top = report.rows[0]
    assert top.op == "fxprune_test.opaque.default" and "test_coverage.py" in top.source
    assert top.params == 24 * 16 + 24 + 24 * 12  # the elements of a's rows and bias, b's columns
    assert top.only_here == 24 + 24 * 12  # a's columns are also frozen by the graph input
    assert top.unprunable == 24 * 16 + 24  # b's columns are still pruned through b's rows group
    out = next(r for r in report.rows if r.op == "output")
    assert out.params == 5 * 12 + 5  # c's rows and bias: the model's output width
    assert report.frozen_params == top.params + out.params
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert "fxprune_test.opaque" in report.table()


def test_cli_analyze_coverage(tmp_path, capsys):
    from fxprune import cli

    code = cli.main(["analyze", "tests.test_coverage:opaque_factory", "--coverage", "--json", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert code == 0 and "ops that froze" in out and "fxprune_test.opaque" in out
    import json

    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["coverage"]["rows"][0]["op"] == "fxprune_test.opaque.default"
