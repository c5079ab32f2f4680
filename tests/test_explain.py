"""The coupling graph answers "why are these coupled" and "why is this frozen" correctly."""

from __future__ import annotations

import re

import networkx as nx
import pytest
import torch

import fxprune
from tests.conftest import traced


class WithFFT(torch.nn.Module):
    """a -> fft (no rule) -> b;  c/d form a free MLP side branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)
        self.c = torch.nn.Linear(8, 12)
        self.d = torch.nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.fft.fft(h).real  # no rule: freezes what it touches
        y = self.b(h)
        return y + self.d(torch.relu(self.c(y)))


def make_fft_model():
    """module:factory for the CLI test."""
    return WithFFT().eval(), {"x": torch.randn(3, 8)}


def _fft_analysis(**kw):
    model, inputs = make_fft_model()
    return fxprune.analyze(fxprune.trace(model, kwargs=inputs), **kw)


def test_why_frozen_names_the_op_without_a_rule_and_its_source_line():
    text = _fft_analysis().explain("a.weight:0")
    assert "fft" in text and "no rule" in text
    assert re.search(r"test_explain\.py:\d+ in forward", text), text


def test_why_frozen_names_the_ignore_entry_and_the_graph_output():
    analysis = _fft_analysis(ignore=["c"])
    assert "ignore=" in analysis.explain("c.weight:0") and "ignored by the user: c.weight" in analysis.explain("c.weight:0")
    assert "frozen by ignore=" in analysis.explain("d.weight:0")  # d[0] is c[1]: one space, frozen
    out = _fft_analysis().explain("d.weight:0")  # without ignore=, d's output dim is the model output
    assert "graph output" in out
    assert "is tied to" in out  # the chain from d.weight[0] to the frozen output


def test_why_coupled_is_a_chain_from_one_parameter_to_the_other():
    _, _, analysis = traced("llama_gqa")
    q, o = "model.layers.0.self_attn.q_proj.weight:0", "model.layers.0.self_attn.o_proj.weight:1"
    text = analysis.why(q, o)
    kv = next(g for g in analysis if g.kind == "kv_heads" and g.block == "model.layers.0")
    assert f"group {kv.id}" in text
    block = text.split("share the units of")[1].split("\n", 1)[1].split(" share the units of")[0]
    steps = [ln.strip() for ln in block.splitlines() if ln.startswith("    ")]
    assert steps[0].startswith("model.layers.0.self_attn.q_proj.weight[0]")
    assert "model.layers.0.self_attn.o_proj.weight[1]" in steps[-1]
    assert all(re.search(r"\[aten\.\w+", s) and "modeling_llama.py" in s for s in steps)


def test_uncoupled_parameters_say_so():
    _, _, analysis = traced("llama_gqa")
    text = analysis.why("model.layers.0.mlp.gate_proj.weight:0", "model.layers.1.mlp.gate_proj.weight:0")
    assert "not coupled" in text and "channels" in text


def test_group_explanations_and_unknown_names():
    _, _, analysis = traced("llama_gqa")
    g = next(g for g in analysis if g.kind == "head_dim")
    text = analysis.explain(g.id)
    assert "head_dim" in text and "inv_freq" in text  # RoPE frequencies shrink with the pairs
    with pytest.raises(KeyError, match="neither a group id nor a parameter"):
        analysis.explain("model.layers.0.no_such.weight")


def test_coupling_graph_components_contain_each_group():
    _, _, analysis = traced("gpt2")
    graph = analysis.coupling_graph()
    assert isinstance(graph, nx.MultiGraph)
    assert analysis.coupling_graph() is graph  # built once
    edge = next(iter(graph.edges(data=True)))[2]
    assert {"how", "node", "op", "source"} <= set(edge)
    prov = analysis.provenance
    for group in analysis:
        atoms = [a for m in group.params for a in prov.dims[fxprune.types.TensorRef(m.node)][m.dim]]
        comp = nx.node_connected_component(graph, atoms[0])
        assert all(a in comp for a in atoms), group.id


def test_no_rule_leaves_a_duty_undone_on_the_zoo():
    for name in ["llama_gqa", "gpt2", "bert", "resnet_tiny", "mixtral", "unet_se"]:
        assert traced(name)[2].rule_defects == (), name


def test_cli_explain_on_a_module_factory(capsys):
    from fxprune import cli

    assert cli.main(["explain", "tests.test_explain:make_fft_model", "a.weight:0"]) == 0
    out = capsys.readouterr().out
    assert "fft" in out and "frozen" in out
    assert cli.main(["explain", "tests.test_explain:make_fft_model", "c.weight", "d.weight"]) == 0
    assert "share the units of group" in capsys.readouterr().out
