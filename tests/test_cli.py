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


@pytest.fixture(scope="module")
def hf_dir_with_tokenizer(tmp_path_factory):
    from tests.helpers_text import save_tiny_llama

    root = tmp_path_factory.mktemp("tok")
    save_tiny_llama(root / "llama", hidden=48, intermediate=112, head_dim=12)
    (root / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    return root


def test_prune_writes_model_report_and_plots_then_eval_reads_it(hf_dir_with_tokenizer, capsys):
    root = hf_dir_with_tokenizer
    out = root / "pruned"
    code = cli.main(["prune", str(root / "llama"), "--ratio", "0.2", "--calib", str(root / "calib.txt"),
                     "--n-samples", "4", "--seq-len", "32", "--out", str(out), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "-20" in text
    for f in ("model.safetensors", "fxprune.json", "report.md", "report.html", "kept_per_layer.png",
              "score_distribution.png", "tokenizer.json"):
        assert (out / f).exists(), f
    assert cli.main(["eval", str(out), "--data", str(root / "calib.txt"), "--n-samples", "4", "--seq-len", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # an existing output directory is refused and left as it was
    before = (out / "model.safetensors").read_bytes()
    assert cli.main(["prune", str(root / "llama"), "--ratio", "0.3", "--out", str(out), "--quiet"]) == cli.EXIT_BAD_INPUT
    assert (out / "model.safetensors").read_bytes() == before


def test_prune_rejects_a_bad_ratio_with_one_line(hf_dir_with_tokenizer, capsys):
    root = hf_dir_with_tokenizer
    code = cli.main(["prune", str(root / "llama"), "--ratio", "1.5", "--out", str(root / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and "ratio" in err
    assert not (root / "x").exists()


@pytest.mark.slow
def test_recover_export_and_bench_commands(hf_dir_with_tokenizer, capsys):
    root = hf_dir_with_tokenizer
    pruned = root / "p2"
    assert cli.main(["prune", str(root / "llama"), "--ratio", "0.25", "--importance", "l2", "--out", str(pruned), "--quiet"]) == 0
    rec = root / "p2-recovered"
    assert cli.main(["recover", str(pruned), "--data", str(root / "calib.txt"), "--steps", "3", "--seq-len", "32",
                     "--out", str(rec), "--quiet"]) == 0
    assert (rec / "model.safetensors").exists() and (rec / "report.md").exists()
    assert cli.main(["export", str(rec), "--onnx", str(root / "m.onnx")]) == 0
    assert "parity" in capsys.readouterr().out
    assert cli.main(["export", str(rec), "--onnx", str(root / "m.onnx")]) == cli.EXIT_BAD_INPUT
    assert cli.main(["bench", str(pruned), "--prompt-len", "16", "--decode-tokens", "4", "--repeats", "2",
                     "--out", str(root / "bench")]) == 0
    assert (root / "bench" / "report.html").exists()
    assert cli.main(["recover", str(pruned), "--data", str(root / "missing.txt")]) == cli.EXIT_BAD_INPUT


@pytest.mark.slow
def test_bench_encoder_times_forward_through_fxprune_runtime(tmp_path, capsys, monkeypatch):
    """`fxprune bench` on an encoder exports both models and times them with runtime.benchmark_forward."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from transformers import BertConfig, BertModel

    from fxprune import runtime

    for name, inter in (("dense", 64), ("pruned", 32)):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=inter)
        BertModel(cfg).save_pretrained(tmp_path / name)
    calls = []
    real = runtime.benchmark_forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "benchmark_forward", spy)
    code = cli.main(["bench", str(tmp_path / "pruned"), "--dense", str(tmp_path / "dense"), "--repeats", "2",
                     "--out", str(tmp_path / "bench")])
    assert code == 0
    assert [c["repeats"] for c in calls] == [2, 2]  # dense, then pruned
    out = capsys.readouterr().out
    assert "prefill / forward (ms)" in out and "decode" not in out
    assert (tmp_path / "bench" / "report.html").exists()
    assert not hasattr(cli, "_encoder_latency")
