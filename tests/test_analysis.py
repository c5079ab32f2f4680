"""The analysis finds the coupled groups a user relies on, with no per-model hints."""

from __future__ import annotations

import collections

import pytest
import torch

import fxprune
from tests.conftest import EXPORTABLE, traced


def _by_kind(groups, block=None):
    out = collections.defaultdict(list)
    for g in groups:
        if block is None or g.block == block:
            out[g.kind].append(g)
    return out


def _member(group, name, dim=None):
    for m in group.members:
        if m.name == name and (dim is None or m.dim == dim):
            return m
    raise AssertionError(f"{name} not in {group.id}: {[(m.name, m.dim) for m in group.members]}")


def test_llama_gqa_kv_groups_repeats_and_rope_pairs():
    model, graph, groups = traced("llama_gqa")
    cfg = model.config
    n_kv, n_q, hd = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    for layer in range(cfg.num_hidden_layers):
        kinds = _by_kind(groups, f"model.layers.{layer}")
        (kv,) = kinds["kv_heads"]
        assert kv.size == n_kv and kv.exact
        p = f"model.layers.{layer}.self_attn."
        assert {p + x + ".weight" for x in ("q_proj", "k_proj", "v_proj", "o_proj")} <= set(kv.param_names)
        # kv group 0 covers the first n_rep query heads and the first kv head
        rep = n_q // n_kv
        assert _member(kv, p + "q_proj.weight").indices([0]) == list(range(rep * hd))
        assert _member(kv, p + "k_proj.weight").indices([0]) == list(range(hd))
        assert _member(kv, p + "o_proj.weight", 1).indices([0]) == list(range(rep * hd))
        (rp,) = kinds["head_repeat"]
        assert rp.size == rep
        # repeat 0 removes query head g * rep from every kv group g
        expect = [i for g in range(n_kv) for i in range(g * rep * hd, g * rep * hd + hd)]
        assert _member(rp, p + "q_proj.weight").indices([0]) == expect
        assert all(m.name.startswith(p) for m in rp.members)
        (mlp,) = kinds["channels"]
        assert mlp.size == cfg.intermediate_size and mlp.exact
    # RoPE: the q/k head_dim space is frequency pairs, shared through the inv_freq buffer
    (rope,) = [g for g in groups if g.kind == "head_dim" and any(m.name.endswith("inv_freq") for m in g.members)]
    assert rope.size == hd // 2
    q = _member(rope, "model.layers.0.self_attn.q_proj.weight")
    for f in range(rope.size):
        idx = q.indices([f])
        assert idx[:2] == [f, f + hd // 2], "a RoPE pair must never be split"
    hidden = [g for g in groups if g.kind == "hidden"]
    # RMSNorm averages over it; the rewrite rescales each norm's weight and eps, which keeps it exact
    assert len(hidden) == 1 and hidden[0].exact
    assert len(groups.norm_scales) == 2 * cfg.num_hidden_layers + 1


def test_tied_embeddings_share_one_group():
    from tests import zoo

    zm = zoo.ZOO["llama_gqa"]
    model = zm.build()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    graph = fxprune.trace(model, kwargs=zm.make_inputs(2, 8))
    groups = fxprune.analyze(graph)
    (hidden,) = [g for g in groups if g.kind == "hidden"]
    names = {m.name for m in hidden.members}
    assert {"model.embed_tokens.weight", "lm_head.weight"} & names


def test_vocab_and_graph_outputs_are_frozen():
    _, graph, groups = traced("llama_gqa")
    for g in groups:
        for m in g.members:
            if m.name in ("lm_head.weight", "model.embed_tokens.weight"):
                assert m.dim == 1, "the vocabulary dim must never be prunable"
    assert any("graph output" in f.reason for f in groups.frozen)


def test_gpt2_fused_qkv_heads_cover_q_k_v_segments():
    model, graph, groups = traced("gpt2")
    cfg = model.config
    hd = cfg.n_embd // cfg.n_head
    (heads,) = _by_kind(groups, "transformer.h.0")["heads"]
    assert heads.size == cfg.n_head and heads.exact
    c_attn = _member(heads, "transformer.h.0.attn.c_attn.weight")
    # Conv1D weight is [in, 3*embed]; head 0 is at offset 0 in each of q, k, v
    assert c_attn.dim == 1
    idx = c_attn.indices([0])
    assert idx == [s * cfg.n_embd + i for s in range(3) for i in range(hd)]


@pytest.mark.parametrize("name", ["bert", "vit", "roberta", "distilbert", "opt", "gpt_neox"])
def test_encoders_and_decoders_have_heads_and_mlp(name):
    _, _, groups = traced(name)
    kinds = _by_kind(groups)
    assert kinds["heads"], f"{name}: no attention heads found"
    assert kinds["channels"], f"{name}: no MLP channels found"
    assert all(g.exact for g in kinds["heads"])


def test_conv_filters_tie_batchnorm_and_residuals():
    _, _, groups = traced("resnet_tiny")
    g0 = [g for g in groups if "stem.0.weight" in g.param_names]
    assert len(g0) == 1
    names = set(g0[0].param_names)
    assert {"stem.1.weight", "stem.1.bias"} <= names  # BN follows its conv
    buffers = {m.name for m in g0[0].members if m.kind == "buffer"}
    assert {"stem.1.running_mean", "stem.1.running_var"} <= buffers
    assert all(g.exact for g in groups)
    assert not any(g.size == 3 for g in groups), "conv kernel positions are not channels"


def test_channel_concat_maps_offsets_into_the_consumer():
    model, _, groups = traced("concat_cnn")
    consumers = [g for g in groups for m in g.members if m.dim == 1 and m.kind == "parameter"
                 and any(mm.dim == 0 for mm in g.members)]
    assert consumers
    # the two branches are separate groups, each feeding a slice of the consumer's inputs
    offsets = set()
    for g in groups:
        for m in g.members:
            if m.dim == 1 and m.kind == "parameter" and len(g.members) > 1:
                offsets.add((m.name, m.indices([0])[0]))
    by_name = collections.defaultdict(set)
    for n, off in offsets:
        by_name[n].add(off)
    assert any(len(v) >= 2 and max(v) > 0 for v in by_name.values()), by_name


def test_fused_qkv_chunk_and_unequal_gqa_slices():
    _, _, groups = traced("fused_qkv_attn")
    assert [g.kind for g in groups].count("heads") == 1
    _, _, groups = traced("gqa_sdpa_attn")
    kinds = _by_kind(groups)
    assert len(kinds["kv_heads"]) == 1 and len(kinds["head_repeat"]) == 1


def test_grouped_and_depthwise_conv():
    _, graph, groups = traced("grouped_cnn")
    assert groups and not groups.unsupported


def test_mixtral_attention_and_experts_analyse():
    _, graph, groups = traced("mixtral")
    kinds = _by_kind(groups)
    assert kinds["kv_heads"] and kinds["head_dim"]


def test_unknown_op_freezes_and_names_the_source_line():
    class WithFFT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.b = torch.nn.Linear(16, 8)
            self.c = torch.nn.Linear(8, 12)
            self.d = torch.nn.Linear(12, 8)

        def forward(self, x):
            h = self.a(x)
            h = torch.fft.fft(h).real  # no rule: must freeze, never guess
            y = self.b(h)
            return y + self.d(torch.relu(self.c(y)))

    model = WithFFT().eval()
    graph = fxprune.trace(model, (torch.randn(3, 8),))
    groups = fxprune.analyze(graph)
    assert groups.unsupported
    u = groups.unsupported[0]
    assert "fft" in u.op and "test_analysis.py" in u.source
    names = {n for g in groups for n in g.param_names}
    assert "a.weight" not in names, "a space touched by an unknown op must be frozen"
    assert "c.weight" in names, "untouched spaces stay prunable"


def test_ignore_list_freezes_named_parameters():
    from tests import zoo

    zm = zoo.ZOO["mlp"]
    model = zm.build()
    graph = fxprune.trace(model, kwargs=zm.make_inputs(2, 8))
    all_groups = fxprune.analyze(graph)
    first = all_groups[0].param_names[0].rsplit(".", 1)[0]
    groups = fxprune.analyze(graph, ignore=[first])
    assert all(first + ".weight" not in g.param_names for g in groups)
    assert len(groups) == len(all_groups) - 1


def test_meta_device_trace_needs_no_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    model = fxprune.meta_model(LlamaForCausalLM, cfg)
    graph = fxprune.trace(model, kwargs={"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    groups = fxprune.analyze(graph)
    assert all(p.device.type == "meta" for p in model.parameters())
    kinds = _by_kind(groups)
    assert len(kinds["kv_heads"]) == 2 and all(g.size == 2 for g in kinds["kv_heads"])


def test_size_one_example_inputs_still_give_dynamic_batch():
    _, graph, _ = traced("mlp")
    from tests import zoo

    zm = zoo.ZOO["llama_gqa"]
    model = zm.build()
    with pytest.warns(UserWarning, match="size 1"):
        g = fxprune.trace(model, kwargs={"input_ids": torch.zeros(1, 1, dtype=torch.long)})
    out = g(input_ids=torch.zeros(3, 5, dtype=torch.long))
    assert out[0].shape[:2] == (3, 5)


def test_export_failure_is_a_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x * 2
            return x

    with pytest.raises(fxprune.CaptureError, match="(?s)could not trace DataDependent.*example inputs"):
        fxprune.trace(DataDependent(), (torch.randn(2, 3),))


def test_summary_and_graphml(tmp_path):
    _, graph, groups = traced("llama_gqa")
    text = groups.summary()
    assert "kv_heads" in text and "exact" in text
    path = groups.to_graphml(str(tmp_path / "deps.graphml"))
    import networkx as nx

    g = nx.read_graphml(path)
    assert any(d.get("type") == "group" for _, d in g.nodes(data=True))


@pytest.mark.parametrize("name", EXPORTABLE)
def test_every_zoo_model_analyses(name):
    _, graph, groups = traced(name)
    ids = [g.id for g in groups]
    assert len(ids) == len(set(ids)), "group ids must be unique"
    for g in groups:
        assert g.size >= 2 and g.params
        for m in g.members:
            assert 0 < m.unit_width * g.size <= m.dim_size * 2
