"""Run exported models: greedy KV-cache decoding and latency benchmarks.

Why this module exists: exporting proves the pruned model computes the right thing; this module
measures what it is worth where it is served.  It is separate from the export pass because it only
needs the written files (and a runtime), not PyTorch modules, and because a CLI, a benchmark
script and a notebook all use the same three tools:

* :func:`onnx_generate`: greedy decoding with the KV cache in ONNX Runtime, mirroring
  ``model.generate(do_sample=False)`` for decoders exported with ``kv_cache=True``;
* :func:`benchmark_latency`: prefill latency and per-token decode latency of such a decoder, with
  IOBinding on CUDA so that the cache stays on the GPU;
* :func:`benchmark_forward`: the latency of one forward pass of any exported model (encoders,
  vision models) through any registered backend (:mod:`fxprune.backends`).

KV-cache I/O names follow Optimum / onnxruntime-genai (see :func:`fxprune.passes.export.kv_io_names`);
per-layer head counts and head dims are read from the session's declared input shapes, so a
pruned model with different widths per layer needs nothing special here.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fxprune.backends import ExportBackend, get_backend, to_numpy
from fxprune.backends.onnx import import_ort, ort_session
from fxprune.errors import ExportError

__all__ = ["ForwardLatencyResult", "LatencyResult", "benchmark_forward", "benchmark_latency", "onnx_generate"]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """Median latencies from :func:`benchmark_latency` (milliseconds) plus the raw samples."""

    prefill_ms: float
    decode_ms_per_token: float
    provider: str
    batch_size: int
    prompt_len: int
    decode_tokens: int
    io_binding: bool
    prefill_samples_ms: list[float] = dataclasses.field(default_factory=list)
    decode_samples_ms: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class ForwardLatencyResult:
    """Median latency of one forward pass from :func:`benchmark_forward` (milliseconds)."""

    forward_ms: float
    backend: str
    provider: str
    input_shapes: dict[str, tuple[int, ...]]
    warmup: int
    repeats: int
    samples_ms: list[float] = dataclasses.field(default_factory=list)


def _median_ms(samples: Sequence[float]) -> float:
    return float(statistics.median(samples)) * 1e3


# --------------------------------------------------------------------------------------------
# KV-cache decoders in ONNX Runtime
# --------------------------------------------------------------------------------------------

_ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclasses.dataclass(frozen=True)
class _KVSpec:
    """Shapes the KV decoder's inputs declare, read from the session (per layer)."""

    past_names: list[str]
    present_names: list[str]
    past_shapes: list[tuple[int, int]]  # (heads, head_dim) per past input
    past_dtype: Any
    vocab: int | None


def _kv_spec(sess: Any) -> _KVSpec:
    inputs = {i.name: i for i in sess.get_inputs()}
    missing = [n for n in ("input_ids", "position_ids") if n not in inputs]
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    if missing or not past_names:
        raise ExportError(
            "this ONNX model is not a KV-cache decoder (export it with kv_cache=True); "
            f"its inputs are {list(inputs)}"
        )
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    shapes = []
    for n in past_names:
        shp = inputs[n].shape
        if not (isinstance(shp[1], int) and isinstance(shp[3], int)):
            raise ExportError(f"{n}: heads/head_dim must be static in the ONNX graph, got {shp}")
        shapes.append((shp[1], shp[3]))
    logits = [o for o in sess.get_outputs() if o.name == "logits"]
    vocab = logits[0].shape[-1] if logits and isinstance(logits[0].shape[-1], int) else None
    dtype = _ORT_TO_NP.get(inputs[past_names[0]].type, np.float32)
    return _KVSpec(past_names, present_names, shapes, dtype, vocab)


def _empty_past(spec: _KVSpec, batch: int) -> dict[str, np.ndarray]:
    return {n: np.zeros((batch, h, 0, d), dtype=spec.past_dtype) for n, (h, d) in zip(spec.past_names, spec.past_shapes)}


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    """HF-style position ids: count of real tokens so far, left padding gets position 0."""
    pos = np.cumsum(mask, axis=1) - 1
    pos = np.where(mask == 0, 0, pos)
    return pos[:, -new:].astype(np.int64)


def _int64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.int64)


class _Runner:
    """One decoder step, either plain ``run`` or IOBinding.

    With IOBinding (used on CUDA) the presents stay on the device as OrtValues and are bound
    straight back as the next step's pasts, so the KV cache never crosses PCIe; only the logits
    of the last position are read back.  :func:`onnx_generate` and :func:`benchmark_latency` both
    step through this class, so decoding and timing run the same code.
    """

    def __init__(self, sess: Any, spec: _KVSpec, io_binding: bool) -> None:
        self.sess, self.spec, self.io_binding = sess, spec, io_binding
        provider = sess.get_providers()[0]
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self.output_names = [o.name for o in sess.get_outputs()]

    def _ortvalue(self, arr: np.ndarray) -> Any:
        return import_ort().OrtValue.ortvalue_from_numpy(arr, self.device, 0)

    def start(self, batch: int) -> dict[str, Any]:
        past = _empty_past(self.spec, batch)
        if self.io_binding:
            return {k: self._ortvalue(v) for k, v in past.items()}
        return past

    def step(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Run one step; returns (argmax next token per row, new past)."""
        pos = _positions(mask, ids.shape[1])
        if not self.io_binding:
            outs = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
            named = dict(zip(self.output_names, outs))
            new_past = {p: named[q] for p, q in zip(self.spec.past_names, self.spec.present_names)}
            return named["logits"][:, -1, :].argmax(-1).astype(np.int64), new_past
        binding = self.sess.io_binding()
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            binding.bind_ortvalue_input(name, self._ortvalue(np.ascontiguousarray(arr)))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.sess.run_with_iobinding(binding)
        values = dict(zip(self.output_names, binding.get_outputs()))
        logits = values["logits"].numpy()
        new_past = {p: values[q] for p, q in zip(self.spec.past_names, self.spec.present_names)}
        return logits[:, -1, :].argmax(-1).astype(np.int64), new_past


def onnx_generate(
    session_or_path: Any,
    input_ids: torch.Tensor | np.ndarray,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | np.ndarray | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    providers: Sequence[str] | None = None,
) -> np.ndarray:
    """Greedy decoding with the KV cache, entirely in ONNX Runtime.

    Mirrors ``model.generate(do_sample=False)``: one prefill step over the prompt, then one token
    per step with the presents fed back as pasts.  Returns ``[batch, prompt + generated]`` ids;
    sequences that hit ``eos_token_id`` are padded with ``pad_token_id`` and decoding stops when
    all have finished (as HF does).  Left-padded batches work through ``attention_mask``.
    """
    sess = ort_session(session_or_path, providers)
    spec = _kv_spec(sess)
    ids = _int64(input_ids)
    if ids.ndim != 2:
        raise ExportError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else _int64(attention_mask)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)

    runner = _Runner(sess, spec, io_binding=False)
    batch = ids.shape[0]
    tokens = ids
    past = runner.start(batch)
    step_ids = ids
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        nxt, new_past = runner.step(step_ids, mask, past)
        nxt = np.where(done, pad, nxt)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        if eos:
            done |= np.isin(nxt, list(eos))
            if done.all():
                break
        past = new_past
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        step_ids = nxt[:, None]
    return tokens


def benchmark_latency(
    session_or_path: Any,
    *,
    example_inputs: Any = None,
    batch_size: int = 1,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    warmup: int = 3,
    repeats: int = 10,
    vocab_size: int | None = None,
    providers: Sequence[str] | None = None,
    io_binding: bool | str = "auto",
    seed: int = 0,
) -> LatencyResult:
    """Prefill latency and per-token decode latency of a KV-cache decoder in ORT.

    Prefill: one step over ``batch_size x prompt_len`` random tokens from an empty cache.
    Decode: ``decode_tokens`` greedy steps after that prefill; per-token latency is the loop time
    divided by ``decode_tokens``.  ``warmup`` untimed runs of each come first (allocator and
    kernel selection), then the median of ``repeats`` timed runs is reported.  ``io_binding``
    ``"auto"`` uses IOBinding on CUDA only, where it keeps the cache on the GPU.

    ``session_or_path`` may also be the PyTorch decoder itself: it is exported first
    (``export_onnx(kv_cache=True)`` into a temporary directory) from ``example_inputs`` in
    torch.export's conventions, or, for an HF model, from inputs built from its config.
    """
    if isinstance(session_or_path, torch.nn.Module):
        import tempfile

        from fxprune.passes.export import export_onnx

        with tempfile.TemporaryDirectory(prefix="fxprune-bench-") as tmp:
            exported = export_onnx(session_or_path, os.path.join(tmp, "decoder.onnx"), example_inputs=example_inputs,
                                   kv_cache=True, optimize=False)
            return benchmark_latency(
                exported, batch_size=batch_size, prompt_len=prompt_len, decode_tokens=decode_tokens, warmup=warmup,
                repeats=repeats, vocab_size=vocab_size, providers=providers, io_binding=io_binding, seed=seed)
    sess = ort_session(session_or_path, providers)
    spec = _kv_spec(sess)
    vocab = vocab_size or spec.vocab
    if vocab is None:
        raise ExportError("vocab size unknown (dynamic logits dim): pass vocab_size=")
    use_binding = (sess.get_providers()[0] == "CUDAExecutionProvider") if io_binding == "auto" else bool(io_binding)
    runner = _Runner(sess, spec, use_binding)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch_size, prompt_len), dtype=np.int64)
    mask = np.ones_like(ids)

    def prefill() -> tuple[np.ndarray, dict[str, Any], float]:
        t0 = time.perf_counter()
        nxt, past = runner.step(ids, mask, runner.start(batch_size))
        return nxt, past, time.perf_counter() - t0

    def decode(nxt: np.ndarray, past: dict[str, Any]) -> float:
        m = mask
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            m = np.concatenate([m, np.ones((batch_size, 1), dtype=np.int64)], axis=1)
            nxt, past = runner.step(nxt[:, None], m, past)
        return (time.perf_counter() - t0) / max(decode_tokens, 1)

    for _ in range(warmup):
        nxt, past, _t = prefill()
        decode(nxt, past)
    pre, dec = [], []
    for _ in range(repeats):
        nxt, past, t = prefill()
        pre.append(t)
        dec.append(decode(nxt, past))
    return LatencyResult(
        prefill_ms=_median_ms(pre), decode_ms_per_token=_median_ms(dec),
        provider=sess.get_providers()[0], batch_size=batch_size, prompt_len=prompt_len,
        decode_tokens=decode_tokens, io_binding=use_binding,
        prefill_samples_ms=[x * 1e3 for x in pre], decode_samples_ms=[x * 1e3 for x in dec],
    )


# --------------------------------------------------------------------------------------------
# Any model, any backend
# --------------------------------------------------------------------------------------------


def _open(session_or_path: Any, backend: str | ExportBackend | None, device: str) -> tuple[ExportBackend, Any]:
    """(backend, session) for a path, an ExportResult (which knows its backend) or a session."""
    if backend is None:
        backend = getattr(session_or_path, "backend", None) or "onnx"
    be = get_backend(backend)
    if isinstance(session_or_path, (str, os.PathLike)):
        return be, be.session(Path(session_or_path), device)
    if hasattr(session_or_path, "path"):  # an ExportResult
        return be, be.session(Path(session_or_path.path), device)
    return be, session_or_path


def benchmark_forward(
    session_or_path: Any,
    inputs: Mapping[str, torch.Tensor | np.ndarray],
    *,
    warmup: int = 3,
    repeats: int = 10,
    backend: str | ExportBackend | None = None,
    device: str = "auto",
) -> ForwardLatencyResult:
    """Median latency of one forward pass of an exported model (encoder, vision model...).

    ``session_or_path`` is a file, an :class:`~fxprune.passes.export.ExportResult` or a session
    the backend opened; ``backend`` defaults to the result's own, else ``"onnx"``.  ``inputs``
    are converted to NumPy once; inputs the exported graph does not take are left out by the
    backend.  ``warmup`` untimed runs come first, then ``repeats`` timed ones.
    """
    if repeats < 1:
        raise ExportError(f"repeats must be >= 1, got {repeats}")
    be, sess = _open(session_or_path, backend, device)
    feed = {k: to_numpy(v) for k, v in inputs.items()}
    for _ in range(warmup):
        be.run(sess, feed)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        be.run(sess, feed)
        samples.append(time.perf_counter() - t0)
    return ForwardLatencyResult(
        forward_ms=_median_ms(samples), backend=be.name, provider=be.provider(sess),
        input_shapes={k: tuple(v.shape) for k, v in feed.items()}, warmup=warmup, repeats=repeats,
        samples_ms=[x * 1e3 for x in samples],
    )
