"""Registry of tiny random-weight models used across the fxprune test suite.

Every entry is a :class:`ZooModel`.  Models are built from HF *config* classes
(never ``from_pretrained``) or are small hand-written ``nn.Module`` s defined
below, so nothing is downloaded.

Sizes are chosen so that the interesting widths are pairwise different numbers
wherever the architecture allows it, so that a purely shape-based analysis
cannot confuse them.  The default decoder geometry is::

    hidden 48, 4 query heads of head_dim 12, 2 kv heads (kv width 24),
    MLP width 112, vocab 100, 2 layers

(``hidden == num_heads * head_dim`` is unavoidable for most HF classes; Qwen3,
Gemma and the hand-written attention blocks use an explicit head_dim so that
the attention width differs from the hidden width.)

Families:
  decoder  HF causal LMs (dense)
  encoder  HF bidirectional text encoders
  vision   ViT-style image transformers
  moe      HF mixture-of-experts causal LMs
  cnn      convolutional nets (HF and hand-written)
  custom   hand-written non-CNN modules (attention blocks, MLP, nn.MultiheadAttention)
  speech   HF audio models (Whisper, Wav2Vec2)

Helpers shared by the tests and ``bench/op_survey.py``:
  :func:`export_kwargs`   the kwargs to call / export a model with (adds ``use_cache=False`` for LMs)
  :func:`dynamic_shapes`  ``dynamic_shapes`` spec for :func:`torch.export.export`
  :func:`export_model`    ``torch.export.export(..., strict=False)`` with those dynamic shapes
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FAMILIES",
    "HEAVY",
    "VOCAB",
    "ZooModel",
    "ZOO",
    "get",
    "names",
    "export_kwargs",
    "dynamic_shapes",
    "export_model",
    "BATCH_DIM",
    "SEQ_DIM",
]

# Dims used for dynamic export.  Keep the bounds in one place.
BATCH_MAX = 1024
SEQ_MAX = 4096

VOCAB = 100
HIDDEN = 48
HEADS = 4
HEAD_DIM = 12
KV_HEADS = 2
INTER = 112
LAYERS = 2
# Learned absolute position tables must cover the whole dynamic seq range,
# otherwise export specialises/guards seq <= max_position_embeddings.
MAX_POS = SEQ_MAX + 4
IMAGE = 32  # image side for vision / cnn models (fixed; seq is ignored)

# Token ids reserved for special tokens in every LM config.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


@dataclass(frozen=True)
class ZooModel:
    name: str  # e.g. "llama_gqa"
    family: str  # one of FAMILIES
    build: Callable[[], nn.Module]  # seeded, eval(), float32, CPU
    make_inputs: Callable[[int, int], dict]  # (batch, seq) -> kwargs (tensors only)
    dynamic: dict  # kwarg name -> {dim_index: "batch" | "seq"}
    causal_lm: bool = False  # HF causal LM usable with .generate()
    exportable: bool = True  # torch.export with dynamic shapes works (see comment at the entry if False)


FAMILIES = ("decoder", "encoder", "vision", "moe", "cnn", "custom", "speech")

ZOO: dict[str, ZooModel] = {}


def _register(zm: ZooModel) -> ZooModel:
    assert zm.family in FAMILIES, zm.family
    assert zm.name not in ZOO, zm.name
    ZOO[zm.name] = zm
    return zm


def get(name: str) -> ZooModel:
    """A zoo model by name (the per-model test registry ZOO, then HEAVY)."""
    try:
        return ZOO[name] if name in ZOO else HEAVY[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)} + heavy {sorted(HEAVY)}") from None


def names(family: str | None = None, *, exportable: bool | None = None, causal_lm: bool | None = None) -> list[str]:
    """Names of zoo models, optionally filtered."""
    out = []
    for n, zm in ZOO.items():
        if family is not None and zm.family != family:
            continue
        if exportable is not None and zm.exportable != exportable:
            continue
        if causal_lm is not None and zm.causal_lm != causal_lm:
            continue
        out.append(n)
    return out


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #


def _gen(batch: int, seq: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * batch + 7919 * seq + 17)


def _text_inputs(*, token_type_ids: bool = False, low: int = 3):
    """input_ids (+ attention_mask of ones) with ids in [low, VOCAB)."""

    def make(batch: int, seq: int) -> dict:
        g = _gen(batch, seq)
        ids = torch.randint(low, VOCAB, (batch, seq), generator=g, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        if token_type_ids:
            out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
        return out

    return make


_TEXT_DYN = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _image_inputs(key: str = "pixel_values", channels: int = 3, side: int = IMAGE):
    def make(batch: int, seq: int) -> dict:  # seq ignored
        g = _gen(batch, 0)
        return {key: torch.randn(batch, channels, side, side, generator=g)}

    return make


def _seq_inputs(key: str = "x", dim: int = HIDDEN):
    def make(batch: int, seq: int) -> dict:
        g = _gen(batch, seq)
        return {key: torch.randn(batch, seq, dim, generator=g)}

    return make


def _vec_inputs(key: str = "x", dim: int = HIDDEN):
    def make(batch: int, seq: int) -> dict:  # seq ignored
        g = _gen(batch, 0)
        return {key: torch.randn(batch, dim, generator=g)}

    return make


# --------------------------------------------------------------------------- #
# HF builders
# --------------------------------------------------------------------------- #


def _finish(model: nn.Module) -> nn.Module:
    model = model.to(device="cpu", dtype=torch.float32)
    model.eval()
    return model


def _hf(model_cls_name: str, config_cls_name: str, **cfg):
    """Builder for a HF model built from a config with random (seeded) weights."""

    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_cls_name)(**cfg)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls_name)(config)
        return _finish(model)

    build.__qualname__ = f"build_{model_cls_name}"
    return build


def _decoder(name, model_cls, config_cls, *, family="decoder", attn="sdpa", exportable=True, **cfg):
    base = dict(
        vocab_size=VOCAB,
        attn_implementation=attn,
        tie_word_embeddings=False,  # untied unless the entry says otherwise
        **SPECIAL,
    )
    if "n_layer" not in cfg:
        base["num_hidden_layers"] = LAYERS
    base.update(cfg)
    return _register(
        ZooModel(
            name=name,
            family=family,
            build=_hf(model_cls, config_cls, **base),
            make_inputs=_text_inputs(),
            dynamic=dict(_TEXT_DYN),
            causal_lm=True,
            exportable=exportable,
        )
    )


_LLAMA = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POS,
)

# --- dense decoders -------------------------------------------------------- #
_decoder("llama_gqa", "LlamaForCausalLM", "LlamaConfig", **_LLAMA)
_decoder("llama_gqa_eager", "LlamaForCausalLM", "LlamaConfig", attn="eager", **_LLAMA)
_decoder("llama_mqa", "LlamaForCausalLM", "LlamaConfig", **{**_LLAMA, "num_key_value_heads": 1})
_decoder("mistral", "MistralForCausalLM", "MistralConfig", **_LLAMA, sliding_window=None)
# Qwen2: q/k/v projections carry a bias, o_proj does not.
_decoder("qwen2", "Qwen2ForCausalLM", "Qwen2Config", **_LLAMA)
# Qwen3: per-head RMSNorm on q and k (q_norm/k_norm of width head_dim); explicit
# head_dim 16 so that the attention width (64 / 32) differs from hidden (48).
_decoder("qwen3", "Qwen3ForCausalLM", "Qwen3Config", **{**_LLAMA, "head_dim": 16})
# Gemma: GeGLU MLP, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), explicit
# head_dim 10 (attention width 40 / 20), lm_head tied to embed_tokens.
_decoder(
    "gemma",
    "GemmaForCausalLM",
    "GemmaConfig",
    **{**_LLAMA, "head_dim": 10},
    tie_word_embeddings=True,
)
# Gemma2: adds post-attn/post-ffw norms, attention + final logit softcapping,
# alternating sliding-window / global layers.  Transformers refuses
# attn_implementation="sdpa" for Gemma2 (softcapping), so it is eager-only.
_decoder(
    "gemma2",
    "Gemma2ForCausalLM",
    "Gemma2Config",
    attn="eager",
    **{**_LLAMA, "head_dim": 10},
    sliding_window=16,
    query_pre_attn_scalar=10,
)
# Phi3: fused qkv_proj (q 48 | k 24 | v 24 = 96) and fused gate_up_proj (2 x 112).
_decoder("phi3", "Phi3ForCausalLM", "Phi3Config", **_LLAMA, original_max_position_embeddings=MAX_POS)
# GPT-2: transformers Conv1D (weight stored [in, out]; exported as view -> addmm(bias, x, W) -> view),
# fused c_attn (3 x 48), learned positions, lm_head tied to wte.
_decoder(
    "gpt2",
    "GPT2LMHeadModel",
    "GPT2Config",
    n_embd=HIDDEN,
    n_head=HEADS,
    n_layer=LAYERS,
    n_inner=INTER,
    n_positions=MAX_POS,
    tie_word_embeddings=True,
)
_decoder(
    "gpt2_eager",
    "GPT2LMHeadModel",
    "GPT2Config",
    attn="eager",
    n_embd=HIDDEN,
    n_head=HEADS,
    n_layer=LAYERS,
    n_inner=INTER,
    n_positions=MAX_POS,
    tie_word_embeddings=True,
)
# GPT-NeoX: fused query_key_value with per-head interleaved [q_h, k_h, v_h] layout,
# partial rotary (50% of head_dim 12 -> 6 rotary dims), parallel residual.
_decoder(
    "gpt_neox",
    "GPTNeoXForCausalLM",
    "GPTNeoXConfig",
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_attention_heads=HEADS,
    max_position_embeddings=MAX_POS,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
# OPT: learned positions with offset 2, ReLU MLP fc1/fc2, biases everywhere.
_decoder(
    "opt",
    "OPTForCausalLM",
    "OPTConfig",
    hidden_size=HIDDEN,
    ffn_dim=INTER,
    num_attention_heads=HEADS,
    word_embed_proj_dim=HIDDEN,
    max_position_embeddings=MAX_POS,
)
# Falcon (new decoder architecture): fused query_key_value (48 + 2*24 = 96) in a
# grouped layout, view(b, s, kv_heads, heads/kv_heads + 2, head_dim) = per kv
# group [q.., k, v]; parallel attention + MLP fed by separate ln_attn / ln_mlp; RoPE.
_decoder(
    "falcon",
    "FalconForCausalLM",
    "FalconConfig",
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    num_kv_heads=KV_HEADS,
    new_decoder_architecture=True,
    ffn_hidden_size=INTER,
    max_position_embeddings=MAX_POS,
    alibi=False,
    bias=False,
)

# --- MoE decoders ---------------------------------------------------------- #
_MOE = dict(
    hidden_size=HIDDEN,
    intermediate_size=80,  # per-expert width (different from the dense INTER)
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POS,
)


def _moe(name, model_cls, config_cls, *, experts, exportable=True, **cfg):
    return _decoder(
        name, model_cls, config_cls, family="moe", experts_implementation=experts, exportable=exportable, **cfg
    )


# Mixtral, 3 experts (a count different from heads/kv heads), top-2.  Transformers 5 stores the experts of a layer as two
# 3-D parameters (``experts.gate_up_proj`` [E, 2*I, H] and ``experts.down_proj``
# [E, H, I]) and dispatches the expert computation on ``experts_implementation``:
#  * "batched_mm": pure ATen; weights are gathered per (token, k) with
#    ``aten.index.Tensor(param, [expert_ids])`` and applied with ``aten.bmm``.
#  * "grouped_mm" (the library default; on CPU it goes through the custom op
#    ``transformers.grouped_mm_fallback``, opaque to graph analysis).
#  * "eager": a python loop over ``nonzero()`` experts -> data-dependent control
#    flow; torch.export fails (GuardOnDataDependentSymNode on expert_hit.shape[0]).
_MIXTRAL = dict(**_MOE, num_local_experts=3, num_experts_per_tok=2, sliding_window=None)
_moe("mixtral", "MixtralForCausalLM", "MixtralConfig", experts="batched_mm", **_MIXTRAL)
_moe("mixtral_grouped_mm", "MixtralForCausalLM", "MixtralConfig", experts="grouped_mm", **_MIXTRAL)
# Not exportable: eager experts loop is data dependent (see above).
_moe("mixtral_eager_experts", "MixtralForCausalLM", "MixtralConfig", experts="eager", exportable=False, **_MIXTRAL)
# Qwen2-MoE: 6 routed experts (width 40, top-2, no top-k renorm) + an always-on
# shared expert (width 88) scaled by sigmoid(shared_expert_gate(x)); q/k/v bias.
_moe(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    "Qwen2MoeConfig",
    experts="batched_mm",
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    moe_intermediate_size=40,
    shared_expert_intermediate_size=88,
    num_experts=6,
    num_experts_per_tok=2,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POS,
)


# --- encoders -------------------------------------------------------------- #
def _encoder(name, model_cls, config_cls, *, attn="sdpa", token_type_ids=False, low=3, **cfg):
    base = dict(vocab_size=VOCAB, attn_implementation=attn, pad_token_id=PAD_ID)
    base.update(cfg)
    dyn = dict(_TEXT_DYN)
    if token_type_ids:
        dyn["token_type_ids"] = {0: "batch", 1: "seq"}
    return _register(
        ZooModel(
            name=name,
            family="encoder",
            build=_hf(model_cls, config_cls, **base),
            make_inputs=_text_inputs(token_type_ids=token_type_ids, low=low),
            dynamic=dyn,
        )
    )


_BERT = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=INTER,
    max_position_embeddings=MAX_POS,
    type_vocab_size=2,
)
_encoder("bert", "BertModel", "BertConfig", token_type_ids=True, **_BERT)
_encoder("bert_eager", "BertModel", "BertConfig", attn="eager", token_type_ids=True, **_BERT)
# RoBERTa: position ids derived from input_ids != pad (cumsum), padding_idx offset.
_encoder("roberta", "RobertaModel", "RobertaConfig", **{**_BERT, "max_position_embeddings": MAX_POS + 2})
# DistilBERT: q_lin/k_lin/v_lin/out_lin, ffn.lin1/lin2, no token types, no pooler.
_encoder(
    "distilbert",
    "DistilBertModel",
    "DistilBertConfig",
    dim=HIDDEN,
    n_layers=LAYERS,
    n_heads=HEADS,
    hidden_dim=INTER,
    max_position_embeddings=MAX_POS,
)


# --- vision ---------------------------------------------------------------- #
def _vision(name, model_cls, config_cls, *, family, **cfg):
    return _register(
        ZooModel(
            name=name,
            family=family,
            build=_hf(model_cls, config_cls, **cfg),
            make_inputs=_image_inputs(),
            dynamic={"pixel_values": {0: "batch"}},
        )
    )


# ViT: 32x32 image, 8x8 patches -> 16 patches + CLS = 17 tokens.
_vision(
    "vit",
    "ViTModel",
    "ViTConfig",
    family="vision",
    image_size=IMAGE,
    patch_size=8,
    num_channels=3,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=INTER,
    attn_implementation="sdpa",
)
# HF convnets (family "cnn").
_vision(
    "hf_resnet",
    "ResNetModel",
    "ResNetConfig",
    family="cnn",
    num_channels=3,
    embedding_size=16,
    hidden_sizes=[24, 40],
    depths=[1, 2],
    layer_type="bottleneck",
)
_vision(
    "hf_convnext",
    "ConvNextModel",
    "ConvNextConfig",
    family="cnn",
    num_channels=3,
    patch_size=4,
    num_stages=2,
    hidden_sizes=[24, 40],
    depths=[1, 2],
    image_size=IMAGE,
)
# MobileNetV2: inverted residuals (expand 1x1 -> depthwise 3x3 -> project 1x1), ReLU6,
# TF "same" padding computed in python.
_vision(
    "hf_mobilenet_v2",
    "MobileNetV2Model",
    "MobileNetV2Config",
    family="cnn",
    num_channels=3,
    image_size=IMAGE,
    depth_multiplier=0.25,
    min_depth=8,
    finegrained_output=False,  # last 1x1 conv -> 320 channels instead of 1280
)


# --------------------------------------------------------------------------- #
# newer HF families (issue 15): MLA, complex RoPE, hybrid linear attention, SSMs,
# encoders with merged batch x heads, speech and vision.  One or two layers,
# hidden 32-48, so that tracing stays fast.
# --------------------------------------------------------------------------- #
_SMALL = dict(hidden_size=32, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=MAX_POS, num_hidden_layers=1)
_SMALL10 = {**_SMALL, "head_dim": 10}  # attention width 40 / 20, different from hidden 32
# DeepSeek-V2 MLA: q through a low-rank q_a_proj (24) + norm + q_b_proj, k/v through the shared
# kv_a_proj_with_mqa (kv rank 16 + one rope key of 8) -> kv_b_proj (4 x (nope 12 + v 10)); the key
# is assembled with new_empty + two slice copy_s; complex RoPE (view_as_complex/polar); a MoE MLP
# (4 experts of 24, top-2) with a shared expert.
_DEEPSEEK = dict(
    hidden_size=32, intermediate_size=72, moe_intermediate_size=24, num_attention_heads=4,
    num_key_value_heads=4, num_hidden_layers=1, first_k_dense_replace=0, n_shared_experts=1,
    n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
    qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=MAX_POS,
)
_moe("deepseek_v2", "DeepseekV2ForCausalLM", "DeepseekV2Config", experts="batched_mm",
     **_DEEPSEEK, topk_method="greedy")
# DeepSeek-V3: the same MLA with real-valued interleaved RoPE, group-limited sigmoid routing.
_moe("deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3Config", experts="batched_mm",
     **_DEEPSEEK, n_group=2, topk_group=1)
# Qwen3-MoE: per-head q/k norm, 4 experts of width 24, top-2.
_moe("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", experts="batched_mm", **_SMALL10,
     moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
# Llama4 (text): complex RoPE (no_rope_layers[0] = 1 means "uses RoPE"), qk L2 norm, chunked
# attention, a MoE (top-1 of 2 experts + shared expert) with scatter_-built router scores.
_moe("llama4", "Llama4ForCausalLM", "Llama4TextConfig", experts="batched_mm", **_SMALL10,
     intermediate_size_mlp=56, num_local_experts=2, num_experts_per_tok=1, moe_layers=[0],
     no_rope_layers=[1], layer_types=["chunked_attention"], attention_chunk_size=16)
# GPT-OSS: attention sinks, sliding window, clamped SwiGLU experts with biases (eager attention:
# transformers has no sdpa path for the sinks).
_moe("gpt_oss", "GptOssForCausalLM", "GptOssConfig", experts="batched_mm", attn="eager", **_SMALL10,
     num_local_experts=4, num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention"])
# Gemma3 (text): q/k norms, sliding window, explicit head_dim 10.
_decoder("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", **_SMALL10, sliding_window=4,
         query_pre_attn_scalar=10, layer_types=["sliding_attention"])
# Gemma3n (text): AltUp (2 streams), LAuReL (rank 8), per-layer inputs of width 12 from their own
# embedding table gated with torch.multiply, in-place slice updates of the AltUp streams.
_decoder("gemma3n", "Gemma3nForCausalLM", "Gemma3nTextConfig", **{**_SMALL10, "intermediate_size": [72]},
         sliding_window=4, layer_types=["full_attention"], hidden_size_per_layer_input=12,
         vocab_size_per_layer_input=VOCAB, altup_num_inputs=2, laurel_rank=8, num_kv_shared_layers=0,
         activation_sparsity_pattern=[0.0])
# OLMo2: norms after attention/MLP (post-norm residuals), q/k RMSNorm over the full width.
_decoder("olmo2", "Olmo2ForCausalLM", "Olmo2Config", **_SMALL)
# Mamba: not exportable with a dynamic sequence: the torch path (no CUDA kernels) loops over the
# sequence in Python, so torch.export specialises its length.
_decoder("mamba", "MambaForCausalLM", "MambaConfig", attn="eager", exportable=False, hidden_size=32,
         state_size=8, num_hidden_layers=1, expand=2, conv_kernel=4, time_step_rank=4)
# Jamba: a Mamba layer then an attention layer with a MoE MLP.  Not exportable with a dynamic
# sequence, like Mamba: the torch scan loops over the sequence.
_moe("jamba", "JambaForCausalLM", "JambaConfig", experts="batched_mm", exportable=False,
     **{**_SMALL, "num_hidden_layers": 2},
     attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
     num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)

_encoder("modernbert", "ModernBertModel", "ModernBertConfig", hidden_size=32, intermediate_size=40,
         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=MAX_POS, local_attention=4,
         layer_types=["sliding_attention"], bos_token_id=BOS_ID, eos_token_id=EOS_ID,
         cls_token_id=BOS_ID, sep_token_id=EOS_ID)
# DeBERTa-v2: disentangled relative attention over merged [batch * heads, ...] scores; the
# relative-position projections are repeated batch = q.size(0) // heads times.
_encoder("deberta_v2", "DebertaV2Model", "DebertaV2Config", attn="eager", hidden_size=32,
         num_hidden_layers=1, num_attention_heads=4, intermediate_size=40, max_position_embeddings=MAX_POS,
         relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
         position_biased_input=False)


def _audio_inputs(key: str, channels: int | None, length: int):
    def make(batch: int, seq: int) -> dict:  # fixed length: the model's positions are fixed
        g = _gen(batch, 0)
        shape = (batch, length) if channels is None else (batch, channels, length)
        return {key: torch.randn(*shape, generator=g)}

    return make


def _whisper_inputs(batch: int, seq: int) -> dict:
    g = _gen(batch, seq)
    return {
        "input_features": torch.randn(batch, 16, 32, generator=g),
        "decoder_input_ids": torch.randint(3, VOCAB, (batch, seq), generator=g, dtype=torch.long),
    }


# Whisper (full encoder-decoder): 16 mel bins, 32 frames -> conv stride 2 -> 16 positions.
_register(ZooModel(
    name="whisper", family="speech",
    build=_hf("WhisperModel", "WhisperConfig", vocab_size=VOCAB, num_mel_bins=16, d_model=32,
              encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
              encoder_ffn_dim=40, decoder_ffn_dim=56, max_source_positions=16, max_target_positions=MAX_POS,
              attn_implementation="sdpa", decoder_start_token_id=BOS_ID, **SPECIAL),
    make_inputs=_whisper_inputs,
    dynamic={"input_features": {0: "batch"}, "decoder_input_ids": {0: "batch", 1: "seq"}},
))
# Wav2Vec2 with a CTC head (so the hidden width is prunable): conv feature extractor (2 layers,
# group norm), positional conv (groups 2, weight norm), 1 layer; its masked_spec_embed is only read
# under spec-augment (train mode).
_register(ZooModel(
    name="wav2vec2", family="speech",
    build=_hf("Wav2Vec2ForCTC", "Wav2Vec2Config", vocab_size=20, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=4, intermediate_size=40, conv_dim=[16, 24], conv_stride=[4, 2],
              conv_kernel=[8, 4], num_feat_extract_layers=2, num_conv_pos_embeddings=4,
              num_conv_pos_embedding_groups=2, mask_time_length=2, mask_time_min_masks=1,
              attn_implementation="sdpa", pad_token_id=0),
    make_inputs=_audio_inputs("input_values", None, 400),
    dynamic={"input_values": {0: "batch"}},
))
# Dinov2 with a classifier (so the hidden width is prunable): 32x32 image, patch 8; its mask_token
# is only read when bool_masked_pos is given.
_vision("dinov2", "Dinov2ForImageClassification", "Dinov2Config", family="vision", image_size=IMAGE,
        patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2, num_labels=10,
        attn_implementation="sdpa")
# SigLIP vision tower with its attention-pooling head (an nn.MultiheadAttention over a dynamic batch).
_vision("siglip", "SiglipVisionModel", "SiglipVisionConfig", family="vision", image_size=IMAGE, patch_size=8,
        hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        vision_use_head=True, attn_implementation="sdpa")
# Swin classifier: window attention with relative position bias, patch merging, and the last stage's
# width (32) pooled by an AdaptiveAvgPool1d over (N, C, L).
_vision("swin", "SwinForImageClassification", "SwinConfig", family="vision", image_size=IMAGE, patch_size=4,
        embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, mlp_ratio=2.0, drop_path_rate=0.0,
        num_labels=10)


# Exportable, but too slow to trace for the per-model test parametrizations (ZOO): tests/test_coverage
# traces them with static shapes; bench/arch_sweep.py and bench/op_survey.py sweep them too.
HEAVY: dict[str, ZooModel] = {}


def _heavy(zm: ZooModel) -> ZooModel:
    ZOO.pop(zm.name)
    HEAVY[zm.name] = zm
    return zm


# Qwen3-Next: a Gated-DeltaNet linear-attention layer (2 key heads x 6, 4 value heads x 5, causal
# conv1d, chunked delta rule whose torch fallback writes 63 rows in place; its full-attention layers
# are Qwen3's) with a MoE MLP and a shared expert.  Dynamic-shape export takes about a minute on CPU.
_heavy(_moe("qwen3_next", "Qwen3NextForCausalLM", "Qwen3NextConfig", experts="batched_mm",
            **_SMALL10, layer_types=["linear_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=6, linear_value_head_dim=5,
            linear_conv_kernel_dim=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            num_experts=4, num_experts_per_tok=2))
# Mamba2 (torch chunked scan): about 20 s to trace.
_heavy(_decoder("mamba2", "Mamba2ForCausalLM", "Mamba2Config", attn="eager", hidden_size=32, state_size=8,
                num_hidden_layers=1, num_heads=8, head_dim=8, expand=2, n_groups=2, conv_kernel=4,
                chunk_size=4, time_step_rank=4))


# --------------------------------------------------------------------------- #
# hand-written models
# --------------------------------------------------------------------------- #


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """stem 3->16, block 16->16 (identity shortcut), block 16->24 stride 2 (conv1x1+BN shortcut), pool, fc 24->10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 24, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ConcatCNN(nn.Module):
    """stem 3->16; branch a 3x3 16->12, branch b 1x1 16->20; cat(dim=1) -> 32; conv 32->24; pool; fc 24->10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.branch_a = nn.Conv2d(16, 12, 3, padding=1)
        self.branch_b = nn.Conv2d(16, 20, 1)
        self.fuse = nn.Conv2d(32, 24, 3, padding=1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], dim=1)
        x = F.relu(self.fuse(x))
        return self.fc(x.mean(dim=(2, 3)))


class GroupedCNN(nn.Module):
    """conv 3->16 + GN; grouped conv 16->32 (groups=4) + GN; depthwise 32->32 (groups=32) + GN;
    pointwise 32->24; pool; fc 24->10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn0 = nn.GroupNorm(4, 16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.gn1 = nn.GroupNorm(4, 32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.gn2 = nn.GroupNorm(8, 32)
        self.pointwise = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn0(self.stem(x)))
        x = F.relu(self.gn1(self.grouped(x)))
        x = F.relu(self.gn2(self.depthwise(x)))
        x = F.relu(self.pointwise(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class FusedQKVAttention(nn.Module):
    """Post-LN MHA block: fused qkv Linear(48 -> 3*40) split with .chunk(3, -1),
    4 heads of head_dim 10 (attention width 40 != d_model 48), explicit
    matmul + softmax attention, out_proj 40 -> 48, residual, LayerNorm."""

    def __init__(self, d_model: int = HIDDEN, num_heads: int = HEADS, head_dim: int = 10):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(d_model, 3 * inner)
        self.out_proj = nn.Linear(inner, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.norm(x + self.out_proj(ctx))


class GQASdpaAttention(nn.Module):
    """Pre-LN causal GQA block with SDPA: fused qkv Linear(48 -> 40 + 20 + 20) split
    by *unequal* slicing (q: 4 heads, k/v: 2 heads, head_dim 10), k/v expanded
    with repeat_interleave(2, dim=1), out_proj 40 -> 48, residual, then a
    SiLU MLP 48 -> 112 -> 48 with residual."""

    def __init__(self, d_model: int = HIDDEN, num_heads: int = HEADS, num_kv_heads: int = KV_HEADS, head_dim: int = 10):
        super().__init__()
        self.h, self.kvh, self.hd = num_heads, num_kv_heads, head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, INTER)
        self.fc2 = nn.Linear(INTER, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(self.norm1(x))
        q = qkv[..., : self.q_size]
        k = qkv[..., self.q_size : self.q_size + self.kv_size]
        v = qkv[..., self.q_size + self.kv_size :]
        q = q.reshape(b, s, self.h, self.hd).transpose(1, 2)
        k = k.reshape(b, s, self.kvh, self.hd).transpose(1, 2)
        v = v.reshape(b, s, self.kvh, self.hd).transpose(1, 2)
        rep = self.h // self.kvh
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(b, s, self.q_size)
        x = x + self.o_proj(o)
        return x + self.fc2(F.silu(self.fc1(self.norm2(x))))


class TinyMLP(nn.Module):
    """Linear 48->112, GELU, Linear 112->80, ReLU, Linear 80->10."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, INTER)
        self.fc2 = nn.Linear(INTER, 80)
        self.fc3 = nn.Linear(80, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.gelu(self.fc1(x)))))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention(48, 4 heads, batch_first=True) self-attention (its
    packed in_proj_weight [144, 48]), residual, LayerNorm, Linear 48 -> 112 -> 48."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, INTER)
        self.fc2 = nn.Linear(INTER, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.mha(x, x, x, need_weights=False)
        x = self.norm(x + a)
        return x + self.fc2(F.gelu(self.fc1(x)))


class UNetSE(nn.Module):
    """Encoder conv+BN (stride 2), ConvTranspose2d upsampling, skip concat with the encoder
    features, a squeeze-and-excitation gate (pool -> fc -> relu -> fc -> sigmoid -> scale),
    1x1 head.  Covers transposed convs and channel-wise gating in one small net."""

    def __init__(self):
        super().__init__()
        self.e1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.e2, self.b2 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.d1 = nn.Conv2d(6 + 8, 10, 3, padding=1)
        self.se1, self.se2 = nn.Linear(10, 4), nn.Linear(4, 10)
        self.out = nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.b1(self.e1(x)))
        b = torch.relu(self.b2(self.e2(a)))
        h = nn.functional.silu(self.d1(torch.cat([self.up(b), a], 1)))
        w = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3))))))
        return self.out(h * w[:, :, None, None])


def _custom(name, cls, family, make_inputs, dynamic):
    def build() -> nn.Module:
        torch.manual_seed(0)
        model = cls()
        # Non-trivial BN statistics, so that eval-mode BN is not an identity.
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        return _finish(model)

    build.__qualname__ = f"build_{cls.__name__}"
    return _register(ZooModel(name=name, family=family, build=build, make_inputs=make_inputs, dynamic=dynamic))


_IMG_DYN = {"x": {0: "batch"}}
_SEQ_DYN = {"x": {0: "batch", 1: "seq"}}
_custom("resnet_tiny", TinyResNet, "cnn", _image_inputs("x"), _IMG_DYN)
_custom("concat_cnn", ConcatCNN, "cnn", _image_inputs("x"), _IMG_DYN)
_custom("grouped_cnn", GroupedCNN, "cnn", _image_inputs("x"), _IMG_DYN)
_custom("unet_se", UNetSE, "cnn", _image_inputs("x"), _IMG_DYN)
_custom("fused_qkv_attn", FusedQKVAttention, "custom", _seq_inputs("x"), _SEQ_DYN)
_custom("gqa_sdpa_attn", GQASdpaAttention, "custom", _seq_inputs("x"), _SEQ_DYN)
_custom("mlp", TinyMLP, "custom", _vec_inputs("x"), {"x": {0: "batch"}})
_custom("torch_mha", TorchMHA, "custom", _seq_inputs("x"), _SEQ_DYN)


# --------------------------------------------------------------------------- #
# export helpers
# --------------------------------------------------------------------------- #


def export_kwargs(zm: ZooModel, batch: int, seq: int) -> dict:
    """kwargs to call (eagerly) or export ``zm``'s model with.

    ``make_inputs`` plus ``use_cache=False`` for HF causal LMs (so that no
    DynamicCache is created and returned)."""
    kw = dict(zm.make_inputs(batch, seq))
    if zm.causal_lm:
        kw["use_cache"] = False
    return kw


BATCH_DIM = torch.export.Dim("batch", min=1, max=BATCH_MAX)
SEQ_DIM = torch.export.Dim("seq", min=1, max=SEQ_MAX)


def dynamic_shapes(zm: ZooModel, kwargs: dict) -> dict:
    """``dynamic_shapes`` for torch.export.export(model, (), kwargs, ...)."""
    dims = {"batch": BATCH_DIM, "seq": SEQ_DIM}
    out = {}
    for k, v in kwargs.items():
        if k in zm.dynamic:
            out[k] = {i: dims[d] for i, d in zm.dynamic[k].items()}
        else:
            out[k] = None
    return out


def export_model(zm: ZooModel, model: nn.Module | None = None, batch: int = 2, seq: int = 8, *, decompose: bool = True):
    """torch.export (non-strict) ``zm`` with its dynamic dims; optionally ``run_decompositions({})``.

    Example inputs must be >= 2 on every dynamic dim (0/1 specialisation)."""
    assert batch >= 2 and seq >= 2
    if model is None:
        model = zm.build()
    kw = export_kwargs(zm, batch, seq)
    ep = torch.export.export(model, (), kw, dynamic_shapes=dynamic_shapes(zm, kw), strict=False)
    if decompose:
        ep = ep.run_decompositions({})
    return ep
