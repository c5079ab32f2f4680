"""The CLI: analyze a local HF checkpoint directory, clear one-line errors, meaningful exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from fxprune import cli


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_analyze_prints_group_table_and_writes_graphml(hf_dir, tmp_path, capsys):
    code = cli.main(["analyze", hf_dir, "--graphml", str(tmp_path / "g.graphml"), "--json", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "kv_heads" in out and "head_repeat" in out and "channels" in out
    assert (tmp_path / "g.graphml").exists()
    groups = json.loads((tmp_path / "g.json").read_text())["groups"]
    assert any(g["kind"] == "kv_heads" and g["units"] == 2 for g in groups)


def test_analyze_on_meta_needs_no_weights(hf_dir, capsys):
    assert cli.main(["analyze", hf_dir, "--meta"]) == 0
    assert "kv_heads" in capsys.readouterr().out


def test_missing_model_path_is_one_line_with_exit_code_2(tmp_path, capsys):
    code = cli.main(["analyze", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT
    assert err.startswith("fxprune: error:") and len(err.strip().splitlines()) == 1
