"""ONNX export: parity at unseen shapes, KV-cache decoding, per-layer head counts, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fxprune.errors import FxpruneError, OutputExistsError, VerificationError  # noqa: E402
from fxprune.backends.onnx import ort_providers  # noqa: E402
from fxprune.passes.export import export_onnx, kv_cache_layout  # noqa: E402
from fxprune.runtime import benchmark_latency, onnx_generate  # noqa: E402

VOCAB = 96


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """GQA Llama: 4 query heads sharing 2 KV heads, head_dim 16."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def _rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[idx].clone()
    return new


def _cols(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def _head_index(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def shrink_attention(attn: nn.Module, q_heads: list[int], kv_heads: list[int]) -> None:
    """Keep the given query/KV heads of a Llama attention, as a structured pruner would."""
    hd = attn.head_dim
    q_idx, kv_idx = _head_index(q_heads, hd), _head_index(kv_heads, hd)
    attn.q_proj = _rows(attn.q_proj, q_idx)
    attn.k_proj = _rows(attn.k_proj, kv_idx)
    attn.v_proj = _rows(attn.v_proj, kv_idx)
    attn.o_proj = _cols(attn.o_proj, q_idx)
    attn.num_key_value_groups = len(q_heads) // len(kv_heads)


def shrink_mlp(mlp: nn.Module, keep: int) -> None:
    idx = torch.arange(keep)
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, idx), _rows(mlp.up_proj, idx)
    mlp.down_proj = _cols(mlp.down_proj, idx)


def pruned_like_llama() -> LlamaForCausalLM:
    """Layer 0 keeps 2 query heads on 1 KV head; layer 1 keeps 2 query heads on 2 KV heads and a
    smaller MLP.  The config still says 4/2 heads: only the modules know the real shapes."""
    model = tiny_llama(seed=1)
    shrink_attention(model.model.layers[0].self_attn, q_heads=[2, 3], kv_heads=[1])
    shrink_attention(model.model.layers[1].self_attn, q_heads=[0, 2], kv_heads=[0, 1])
    shrink_mlp(model.model.layers[1].mlp, keep=80)
    return model.eval()


class TinyCNN(nn.Module):
    """Conv+BN+ReLU twice, global pooling, linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def trained_bn_cnn() -> TinyCNN:
    """A CNN whose BatchNorm running stats are not the defaults, so eval-mode export matters."""
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 12, 12) * 2 + 0.5)
    return model


def ids(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gqa_llama_parity_at_unseen_shapes(tmp_path):
    model = tiny_llama(layers=1)  # one layer: export time grows with the graph
    with pytest.warns(UserWarning, match="enlarged"):
        res = export_onnx(model, tmp_path / "llama.onnx", example_inputs=ids(1, 6))
    assert res.path.is_file() and res.file_size == os.path.getsize(res.path)
    assert res.input_names == ["input_ids", "attention_mask"] and res.output_names == ["logits"]
    assert res.check_shapes["input_ids"] == (3, 9)  # enlarged batch 2 -> +1, seq 6 -> +3
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    assert not model.training  # it was in eval mode before and still is
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    for b, s in [(1, 1), (5, 17)]:
        feed = {k: v.numpy() for k, v in ids(b, s, seed=b).items()}
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        np.testing.assert_allclose(sess.run(None, feed)[0], want, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_bert_parity(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = BertModel(cfg)
    model.train()  # export must switch to eval (no dropout) and hand the module back in train mode
    ex = ids(2, 7)
    ex["token_type_ids"] = torch.zeros_like(ex["input_ids"])
    res = export_onnx(
        model, tmp_path / "bert.onnx", example_inputs=ex, check_batch=4, check_seq=11, optimize=False
    )
    assert res.output_names == ["last_hidden_state", "pooler_output"]
    assert res.check_shapes["input_ids"] == (4, 11)
    assert res.max_abs_diff < 1e-4
    assert model.training and all(m.training for m in model.modules())


def test_cnn_parity_overwrite_and_external_data(tmp_path):
    model = trained_bn_cnn()
    target = tmp_path / "cnn.onnx"
    target.write_bytes(b"old")
    res = export_onnx(
        model, target, example_inputs={"x": torch.randn(2, 3, 12, 12)}, overwrite=True, external_data=True
    )
    assert res.external_data and (tmp_path / "cnn.onnx.data").is_file()
    assert res.check_shapes["x"] == (3, 3, 12, 12)  # images: only the batch is dynamic
    assert res.max_abs_diff < 1e-4
    assert target.read_bytes() != b"old"
    assert model.training  # restored

    import onnxruntime as ort

    sess = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 12, 12)
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], model(x).numpy(), rtol=1e-3, atol=1e-4)
    with pytest.raises(FxpruneError, match="kv_cache=True"):  # not a KV-cache decoder
        onnx_generate(sess, torch.ones(1, 3, dtype=torch.long), 2)


def test_exported_program_input(tmp_path):
    model = trained_bn_cnn().eval()
    ep = torch.export.export(
        model, (torch.randn(2, 3, 12, 12),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    res = export_onnx(ep, tmp_path / "ep.onnx", example_inputs={"x": torch.randn(2, 3, 12, 12)})
    assert res.check_shapes["x"][0] == 3 and res.max_abs_diff < 1e-4


def test_existing_output_is_refused_and_untouched(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"precious")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        export_onnx(TinyCNN(), target, example_inputs={"x": torch.randn(2, 3, 8, 8)})
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == before


class Noisy(nn.Module):
    """Draws random numbers, so ONNX Runtime cannot reproduce PyTorch's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.rand_like(x)


def test_failed_check_raises_and_writes_nothing(tmp_path):
    with pytest.raises(VerificationError, match="max \\|diff\\|"):
        export_onnx(Noisy(), tmp_path / "noisy.onnx", example_inputs={"x": torch.randn(2, 4)})
    assert not list(tmp_path.iterdir())  # neither the model nor a temp dir is left behind


def test_bad_arguments(tmp_path):
    with pytest.raises(FxpruneError, match="example_inputs"):
        export_onnx(TinyCNN(), tmp_path / "a.onnx", example_inputs={})
    with pytest.raises(FxpruneError, match="nn.Module or torch.export.ExportedProgram"):
        export_onnx("not a model", tmp_path / "a.onnx", example_inputs={"x": torch.randn(2, 3, 8, 8)})
    assert not list(tmp_path.iterdir())


def test_missing_parent_directory_is_created(tmp_path):
    res = export_onnx(TinyCNN().eval(), tmp_path / "new" / "dir" / "a.onnx", example_inputs={"x": torch.randn(2, 3, 8, 8)})
    assert res.path.exists()


def test_ort_providers_cpu():
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    assert ort_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(FxpruneError):
        ort_providers("tpu")


def test_kv_layout_reads_modules_not_config():
    assert kv_cache_layout(tiny_llama()) == [(2, 16, 16), (2, 16, 16)]
    assert kv_cache_layout(pruned_like_llama()) == [(1, 16, 16), (2, 16, 16)]


@pytest.fixture(scope="module")
def pruned_kv(tmp_path_factory):
    """One KV-cache export of the pruned-like Llama shared by the decoding tests (exports are slow)."""
    model = pruned_like_llama()
    path = tmp_path_factory.mktemp("kv") / "decoder.onnx"
    with pytest.warns(UserWarning, match="enlarged"):
        res = export_onnx(
            model, path, example_inputs={"input_ids": torch.randint(3, VOCAB, (1, 5))}, kv_cache=True,
            optimize=False,  # only makes the export faster; the benchmark covers optimized KV graphs
        )
    return model, res


@pytest.mark.slow
def test_kv_export_names_and_per_layer_shapes(pruned_kv):
    model, res = pruned_kv
    assert res.input_names == [
        "input_ids", "attention_mask", "position_ids",
        "past_key_values.0.key", "past_key_values.0.value",
        "past_key_values.1.key", "past_key_values.1.value",
    ]
    assert res.output_names == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert res.max_abs_diff < 1e-4
    assert res.check_shapes["past_key_values.0.key"][1] == 1 and res.check_shapes["past_key_values.1.key"][1] == 2

    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    heads = {i.name: i.shape[1] for i in sess.get_inputs() if i.name.startswith("past")}
    assert heads == {"past_key_values.0.key": 1, "past_key_values.0.value": 1,
                     "past_key_values.1.key": 2, "past_key_values.1.value": 2}


@pytest.mark.slow
def test_kv_greedy_decode_matches_generate(pruned_kv):
    model, res = pruned_kv
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    gen_cfg = model.generation_config
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    got = onnx_generate(res.path, prompt, 12, eos_token_id=gen_cfg.eos_token_id, pad_token_id=gen_cfg.pad_token_id)
    assert got.tolist() == want.tolist()


@pytest.mark.slow
def test_kv_greedy_decode_left_padded_batch(pruned_kv):
    model, res = pruned_kv
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 0, 0  # left padding on row 0
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = onnx_generate(res.path, prompt, 6, attention_mask=mask, eos_token_id=2, pad_token_id=0)
    assert got.tolist() == want.tolist()


@pytest.mark.slow
def test_benchmark_latency_runs(pruned_kv):
    _, res = pruned_kv
    plain = benchmark_latency(res.path, prompt_len=8, decode_tokens=3, warmup=1, repeats=2, io_binding=False)
    bound = benchmark_latency(res.path, prompt_len=8, decode_tokens=3, warmup=1, repeats=2, io_binding=True)
    for r in (plain, bound):
        assert r.prefill_ms > 0 and r.decode_ms_per_token > 0 and len(r.decode_samples_ms) == 2
    assert bound.io_binding and not plain.io_binding and plain.provider == "CPUExecutionProvider"


def test_a_grouped_mm_mixture_of_experts_exports_and_keeps_its_implementation(tmp_path):
    """transformers 5's default experts implementation ("grouped_mm") is a custom op the ONNX
    exporter cannot convert: the export runs the experts as gather + bmm, checks parity, says so,
    and leaves the model's own implementation in place."""
    import warnings

    from tests import zoo

    zm = zoo.ZOO["mixtral_grouped_mm"]
    model = zm.build()
    assert model.config._experts_implementation == "grouped_mm"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = export_onnx(model, tmp_path / "moe.onnx", example_inputs=zm.make_inputs(2, 8))
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    assert any("batched_mm" in n for n in res.notes) and any("batched_mm" in str(w.message) for w in caught)
    assert model.config._experts_implementation == "grouped_mm"
