"""A small causal LM with real (trained) weights that every machine can rebuild, plus eval helpers.

Shared by ``bench/quality.py``, its torch-pruning worker (``bench/_tp_worker.py``, which runs under
transformers 4.46.3 in its own virtualenv: keep this module's top-level imports to numpy/torch
and the standard library) and any other script that wants a trained checkpoint.

Data: the Python standard library's own ``*.py`` sources (``sysconfig.get_paths()["stdlib"]``),
without ``site-packages``, test suites and machine-specific files, visited in sorted order.
Files whose sorted index is ``% 20 == 0`` are the held-out test split; every ``TRAIN_EVERY``-th of
the others is the training corpus (~1M tokens).

Tokenizer: byte-level BPE (``tokenizers``, vocab 2048) trained on the train split,
``<|endoftext|>`` between files.  Models (``family``): ``llama`` (``LlamaForCausalLM``, hidden 192, GQA 6 q /
2 kv heads, RoPE, SwiGLU, untied embeddings, ~2.4M parameters) and ``qwen3``
(``Qwen3ForCausalLM``: the same sizes with q/k RMSNorms and tied embeddings) and ``gpt_neox``
(``GPTNeoXForCausalLM``: LayerNorm, fused qkv, partial RoPE, parallel residual, GELU MLP) and
``mixtral`` (``MixtralForCausalLM``: 8 experts of width 128, top-2), trained with AdamW
for several epochs over the training corpus (shuffled non-overlapping 128-token windows, seeded)
until the held-out loss flattens (logged as ``train_info.json`` "curve").  The result
(``save_pretrained`` + ``tokenizer.json`` + ``train_info.json``) is cached under
``<cache_dir>/lm-<family>-<hash of settings and corpus>/`` so reruns skip training.

Public helpers::

    model_dir, tokenizer = train_or_load_lm(cache_dir, quick=False, family="llama")
    model = load_lm(model_dir)
    windows = heldout_windows(model_dir_or_tokenizer, n=64, seq_len=128)   # LongTensor [n, seq]
    batches = calib_batches(tokenizer, n=16, seq_len=128, batch_size=1)    # list of dicts
    ppl     = perplexity(model, windows, batch_size=16)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

EOS = "<|endoftext|>"
TEST_EVERY = 20  # file i (sorted) is held out when i % TEST_EVERY == 0

# Settings chosen so that the model is trained to convergence (several epochs) on a shared 2-core
# CPU in well under an hour: a quarter of the train files (every TRAIN_EVERY-th; ~1M tokens with
# the 2048-token BPE), 4 epochs, a 4-layer model, hidden 192, 6 q / 2 kv heads of 32 and a 512-wide MLP (~2.4M parameters).
# The embeddings (untied) are ~40% of the parameters, as in the earlier 6M model, so "50% removed"
# still forces the hidden width or very deep block cuts.  The held-out loss is logged along the
# way (``train_info.json`` "curve") to show it flattening.
TRAIN_EVERY = 4  # the training corpus: train files (sorted) whose index % TRAIN_EVERY == 1
LM_SETTINGS: dict[str, Any] = {
    "family": "llama",
    "vocab_size": 2048,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "seq_len": 128,
    "batch_size": 16,
    "epochs": 4,
    "lr": 3e-3,
    "min_lr_frac": 0.05,
    "warmup": 50,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "seed": 0,
}
# A second family: Qwen3-style (q/k RMSNorm over head_dim, tied input/output embeddings).
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen3": {"family": "qwen3", "tie_word_embeddings": True, "seed": 1},
    # A third, unlike both: GPT-NeoX (LayerNorm with biases, fused qkv with biases, partial RoPE,
    # parallel attention + MLP residual, a plain GELU MLP as wide as the SwiGLU's three matrices).
    "gpt_neox": {"family": "gpt_neox", "intermediate_size": 768, "num_key_value_heads": 6, "seed": 2},
    # Mixture of experts: Mixtral (8 SwiGLU experts of width 128, top-2 routing, trained with the
    # router's load-balancing loss), the Llama attention otherwise.
    "mixtral": {"family": "mixtral", "intermediate_size": 128, "num_local_experts": 8, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.02, "seed": 3},
}
# --quick: same architecture, a few steps (smoke test of the pipeline, not of quality).
QUICK_OVERRIDES: dict[str, Any] = {"epochs": 0.05, "warmup": 5}


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The stdlib's ``*.py`` files in sorted order (relative-path order), machine-specific ones out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        parts = rel.parts
        if any(d in _SKIP_DIRS or d.startswith("config-") for d in parts[:-1]):
            continue
        if parts[-1].startswith("_sysconfigdata"):
            continue
        out.append(rel)
    return [root / r for r in sorted(out, key=lambda r: r.as_posix())]


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def split_files() -> tuple[list[Path], list[Path]]:
    """``(train, test)``: the test split is every ``TEST_EVERY``-th file of :func:`stdlib_files`;
    the training corpus is every ``TRAIN_EVERY``-th of the others (see :data:`TRAIN_EVERY`)."""
    files = stdlib_files()
    test = [f for i, f in enumerate(files) if i % TEST_EVERY == 0]
    rest = [f for i, f in enumerate(files) if i % TEST_EVERY != 0]
    train = [f for j, f in enumerate(rest) if j % TRAIN_EVERY == 1]
    return train, test


def corpus_fingerprint() -> str:
    """Hash of the corpus (relative paths + sizes + Python version): keys the cache."""
    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256(sys.version.split()[0].encode())
    for f in stdlib_files():
        h.update(f.relative_to(root).as_posix().encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization) with one special token, ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(model_dir: str | Path):
    """The raw ``tokenizers.Tokenizer`` saved as ``tokenizer.json`` (works under any transformers)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def hf_tokenizer(model_dir: str | Path):
    """A ``PreTrainedTokenizerFast`` over ``tokenizer.json`` (loads under transformers 4.x and 5.x)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"),
                                   eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def _as_tokenizer(tok_or_dir: Any):
    if isinstance(tok_or_dir, (str, Path)):
        return load_tokenizer(tok_or_dir)
    return tok_or_dir


def encode_stream(tokenizer: Any, files: Sequence[Path]) -> np.ndarray:
    """Concatenate the token ids of ``files`` with ``<|endoftext|>`` after each (int32 array)."""
    tok = _as_tokenizer(tokenizer)
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    texts = [_read(f) for f in files]
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


_STREAMS: dict[tuple, np.ndarray] = {}


def token_stream(tokenizer: Any, split: str, cache_dir: str | Path | None = None) -> np.ndarray:
    """Token ids of the ``"train"`` or ``"test"`` split (cached in memory and, with ``cache_dir``, on disk)."""
    tok = _as_tokenizer(tokenizer)
    key = (id(tok), split)
    if key in _STREAMS:
        return _STREAMS[key]
    path = Path(cache_dir) / f"{split}_ids.npy" if cache_dir is not None else None
    if path is not None and path.exists():
        arr = np.load(path)
    else:
        train, test = split_files()
        arr = encode_stream(tok, train if split == "train" else test)
        if path is not None:
            _atomic_save_npy(path, arr)
    _STREAMS[key] = arr
    return arr


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def _evenly_spaced_windows(stream: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """``n`` non-overlapping windows at evenly spaced offsets over the whole stream."""
    if len(stream) < n * seq_len:
        raise ValueError(f"stream of {len(stream)} tokens is too short for {n} windows of {seq_len}")
    starts = np.linspace(0, len(stream) - seq_len, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def heldout_windows(model_dir_or_tokenizer: Any, n: int = 64, seq_len: int = 128,
                    cache_dir: str | Path | None = None) -> torch.Tensor:
    """Fixed held-out evaluation set: ``n`` windows of ``seq_len`` tokens of the test split.

    ``model_dir_or_tokenizer``: the checkpoint dir from :func:`train_or_load_lm` (its token
    streams are cached there) or a ``tokenizers.Tokenizer``.
    """
    if isinstance(model_dir_or_tokenizer, (str, Path)) and cache_dir is None:
        cache_dir = model_dir_or_tokenizer
    stream = token_stream(model_dir_or_tokenizer, "test", cache_dir)
    return _evenly_spaced_windows(stream, n, seq_len)


def calib_windows(model_dir_or_tokenizer: Any, n: int = 16, seq_len: int = 128, seed: int = 0,
                  cache_dir: str | Path | None = None) -> torch.Tensor:
    """``n`` calibration windows from the *train* split at seeded random offsets: LongTensor [n, seq]."""
    if isinstance(model_dir_or_tokenizer, (str, Path)) and cache_dir is None:
        cache_dir = model_dir_or_tokenizer
    stream = token_stream(model_dir_or_tokenizer, "train", cache_dir)
    rng = np.random.default_rng(10_000 + seed)
    starts = rng.integers(0, len(stream) - seq_len, size=n)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


def calib_batches(model_dir_or_tokenizer: Any, n: int = 16, seq_len: int = 128, batch_size: int = 1,
                  seed: int = 0, cache_dir: str | Path | None = None) -> list[dict[str, torch.Tensor]]:
    """:func:`calib_windows` as ready batches ``{"input_ids", "attention_mask"}`` of ``batch_size`` rows."""
    w = calib_windows(model_dir_or_tokenizer, n=n, seq_len=seq_len, seed=seed, cache_dir=cache_dir)
    return [{"input_ids": w[i:i + batch_size], "attention_mask": torch.ones_like(w[i:i + batch_size])}
            for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in {type(out).__name__}")


@torch.no_grad()
def mean_nll(model: Any, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted positions of ``windows``."""
    if hasattr(model, "eval"):
        try:
            model.eval()
        except Exception:  # noqa: BLE001 - exported GraphModules refuse .eval()
            pass
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        logits = _logits(model(input_ids=ids, attention_mask=torch.ones_like(ids))).float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return total / count


def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 16) -> float:
    """``exp`` of :func:`mean_nll`."""
    return math.exp(mean_nll(model, windows, batch_size))


def unigram_perplexity(train_stream: np.ndarray, windows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the train split (same positions)."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1).numpy()
    return float(math.exp(-logp[targets].mean()))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def lm_settings(quick: bool = False, family: str = "llama") -> dict[str, Any]:
    if family not in FAMILY_OVERRIDES:
        raise ValueError(f"unknown LM family {family!r}; choose one of {sorted(FAMILY_OVERRIDES)}")
    s = {**LM_SETTINGS, **FAMILY_OVERRIDES[family]}
    if quick:
        s.update(QUICK_OVERRIDES)
    return s


def settings_key(settings: dict[str, Any]) -> str:
    blob = json.dumps({"settings": settings, "corpus": corpus_fingerprint(), "test_every": TEST_EVERY,
                       "train_every": TRAIN_EVERY,
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_config(settings: dict[str, Any], vocab_size: int, eos_id: int):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        max_position_embeddings=settings["max_position_embeddings"],
        tie_word_embeddings=settings["tie_word_embeddings"],
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    if settings["family"] == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, rotary_pct=0.25, rotary_emb_base=settings["rope_theta"],
                                          use_parallel_residual=True)
    moe = {k: settings[k] for k in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef") if k in settings}
    cls = {"llama": transformers.LlamaConfig, "qwen3": getattr(transformers, "Qwen3Config", None),
           "mixtral": getattr(transformers, "MixtralConfig", None)}[settings["family"]]
    return cls(**common, **moe, head_dim=settings["head_dim"], num_key_value_heads=settings["num_key_value_heads"],
               rope_theta=settings["rope_theta"])


def train_or_load_lm(cache_dir: str | Path, quick: bool = False, log: Any = print,
                     family: str = "llama") -> tuple[Path, Any]:
    """Return ``(model_dir, tokenizer)``: the cached checkpoint, training it first if needed.

    ``model_dir`` holds ``config.json``/``model.safetensors`` (``LlamaForCausalLM.from_pretrained``),
    ``tokenizer.json`` (+ a ``PreTrainedTokenizerFast`` config), ``train_ids.npy``/``test_ids.npy``
    and ``train_info.json`` (settings, losses, wall time, held-out and unigram perplexity).
    ``tokenizer`` is the raw ``tokenizers.Tokenizer``.
    """
    settings = lm_settings(quick, family)
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    model_dir = cache_dir / f"lm-{family}-{'quick-' if quick else ''}{settings_key(settings)}"
    if (model_dir / "train_info.json").exists():
        return model_dir, load_tokenizer(model_dir)
    tmp_dir = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _train(settings, tmp_dir, log)
    if model_dir.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, model_dir)
    return model_dir, load_tokenizer(model_dir)


def causal_lm_class(family: str):
    """The transformers class of a benchmark LM family."""
    import transformers

    return {"llama": transformers.LlamaForCausalLM, "qwen3": getattr(transformers, "Qwen3ForCausalLM", None),
            "gpt_neox": getattr(transformers, "GPTNeoXForCausalLM", None),
            "mixtral": getattr(transformers, "MixtralForCausalLM", None)}[family]


def load_lm(model_dir: str | Path):
    """The trained checkpoint as its transformers class (eval mode)."""
    info = json.loads((Path(model_dir) / "train_info.json").read_text())
    return causal_lm_class(info["settings"].get("family", "llama")).from_pretrained(model_dir).eval()


def _train(settings: dict[str, Any], out_dir: Path, log: Any) -> None:
    t_start = time.perf_counter()
    torch.manual_seed(settings["seed"])
    train_files, test_files = split_files()
    log(f"[lm] corpus: {len(train_files)} train / {len(test_files)} test stdlib files")
    t0 = time.perf_counter()
    tok = train_tokenizer([_read(f) for f in train_files], settings["vocab_size"])
    tok.save(str(out_dir / "tokenizer.json"))
    t_tok = time.perf_counter() - t0
    train_ids = token_stream(tok, "train", out_dir)
    test_ids = token_stream(tok, "test", out_dir)
    log(f"[lm] tokenizer: vocab {tok.get_vocab_size()}, {len(train_ids):,} train / {len(test_ids):,} test "
        f"tokens ({t_tok:.0f}s)")
    eos = tok.token_to_id(EOS)
    config = build_config(settings, tok.get_vocab_size(), eos)
    model = causal_lm_class(settings["family"])(config)
    n_params = sum(p.numel() for p in model.parameters())
    seq, bs = settings["seq_len"], settings["batch_size"]
    steps = max(1, int(round(settings["epochs"] * len(train_ids) / (seq * bs))))
    log(f"[lm] {type(model).__name__}: {n_params:,} parameters; training {steps} steps "
        f"({settings['epochs']} epochs) of {bs}x{seq} tokens on {torch.get_num_threads()} threads")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=settings["lr"], betas=(0.9, 0.95), eps=1e-8)
    warm, lr0, floor = settings["warmup"], settings["lr"], settings["min_lr_frac"]

    def lr_at(step: int) -> float:
        if step < warm:
            return lr0 * (step + 1) / warm
        prog = (step - warm) / max(1, steps - warm)
        return lr0 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))

    rng = np.random.default_rng(settings["seed"])
    eval_w = _evenly_spaced_windows(test_ids, 64, seq)
    curve_w = eval_w[::2]  # 32 windows: the held-out curve
    # each epoch visits every non-overlapping window once, in a seeded random order
    n_windows = (len(train_ids) - 1) // seq
    order: list[int] = []
    losses: list[float] = []
    curve: list[dict[str, float]] = []
    every = max(1, steps // 16)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if len(order) < bs:
            order.extend(rng.permutation(n_windows).tolist())
        starts = [w * seq for w in order[:bs]]
        del order[:bs]
        ids = torch.from_numpy(np.stack([train_ids[s:s + seq] for s in starts]).astype(np.int64))
        # an MoE model trains with its router's load-balancing loss (its config keeps it off, so
        # the saved model's loss, which pruning calibrates on, is the LM loss alone)
        extra = {"output_router_logits": True} if "router_aux_loss_coef" in settings else {}
        loss = model(input_ids=ids, labels=ids, **extra).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step == steps - 1:
            model.eval()
            held = mean_nll(model, curve_w)
            model.train()
            el = time.perf_counter() - t0
            point = {"step": step + 1, "epoch": round((step + 1) * bs * seq / len(train_ids), 3),
                     "train_loss": float(np.mean(losses[-every:])), "heldout_loss": held}
            curve.append(point)
            log(f"[lm] step {step + 1}/{steps} (epoch {point['epoch']:.2f}) train {point['train_loss']:.3f} "
                f"held-out {held:.3f} ({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)")
    t_train = time.perf_counter() - t0
    model.eval()
    ppl = perplexity(model, eval_w)
    uni = unigram_perplexity(train_ids, eval_w, tok.get_vocab_size())
    log(f"[lm] held-out perplexity {ppl:.2f} (unigram baseline {uni:.1f})")

    model.save_pretrained(out_dir)
    try:
        hf_tokenizer(out_dir).save_pretrained(out_dir)  # tokenizer_config.json etc.; tokenizer.json kept
    except Exception as e:  # noqa: BLE001 - tokenizer.json alone is enough for every consumer here
        log(f"[lm] note: PreTrainedTokenizerFast.save_pretrained failed ({e}); tokenizer.json only")
    tok.save(str(out_dir / "tokenizer.json"))
    last = curve[-4:]
    info = {
        "settings": settings,
        "params": n_params,
        "train_files": len(train_files),
        "test_files": len(test_files),
        "train_tokens": int(len(train_ids)),
        "test_tokens": int(len(test_ids)),
        "steps": steps,
        "tokens_seen": steps * bs * seq,
        "epochs_seen": steps * bs * seq / len(train_ids),
        "final_train_loss": curve[-1]["train_loss"],
        "curve": curve,
        "heldout_loss_change_last_quarter": (last[-1]["heldout_loss"] - last[0]["heldout_loss"]) if len(last) > 1 else None,
        "heldout_ppl_64x128": ppl,
        "unigram_ppl_64x128": uni,
        "tokenizer_s": round(t_tok, 1),
        "train_s": round(t_train, 1),
        "total_s": round(time.perf_counter() - t_start, 1),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2))
