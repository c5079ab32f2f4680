"""Recovery fine-tuning of a pruned model: LoRA, knowledge distillation, or both.

Why: structured pruning removes whole heads and channels, and even a well-scored plan costs some
quality.  A short, cheap fine-tune (LoRA adapters on the pruned eager model, optionally pulled
towards the dense model's outputs, Minitron-style) recovers most of it.  The result is merged
back into plain weights, so what the user gets is again just their own ``nn.Module`` class.

Entry point: :func:`recover`.  The input model (and the teacher) are never modified: the student
is a deep copy, and the teacher's mode/device are restored afterwards.

Objectives (``method``):

* ``"lora"``: next-token cross-entropy on the data (``labels`` = inputs, prompt tokens masked
  for instruction data).  Needs a model that returns logits.
* ``"distill"``: LoRA adapters trained on distillation loss only, no labels needed.  For models
  with logits: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` per token, averaged over
  non-padding tokens.  For encoders without logits (e.g. ``BertModel`` returning
  ``last_hidden_state``) the student's output hidden states (``distill_target="hidden"``) or
  pooled embeddings (``"pooled"``) are matched to the teacher's with MSE (default) or
  ``1 - cosine`` (``distill_loss="cosine"``); this needs equal output widths.
* ``"lora+distill"``: ``(1 - alpha) * CE + alpha * KD``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxprune.errors import DataError, RecoveryError
from fxprune.util import text as textdata
from fxprune.util.hf import cache_off
from fxprune.util.hf import is_linear_like as _is_linear_like
from fxprune.util.modules import resolve_device as _resolve_device
from fxprune.util.outputs import tensor_leaves

__all__ = ["RecoveryResult", "RecoveryError", "recover", "default_target_modules", "shot_lora"]

METHODS = ("lora", "distill", "lora+distill")

#: Alpaca's prompt template (Taori et al. 2023); the response is what the loss is taken on.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)

INSTRUCTION_FIELDS = textdata.INSTRUCTION_FIELDS

@dataclasses.dataclass
class RecoveryResult:
    """Outcome of :func:`recover`.

    ``loss_*``/``ppl_*`` are the eval-split next-token loss and perplexity before and after
    training for models with logits; for encoders without logits ``loss_*`` is the distillation
    loss and ``ppl_*`` is ``None``.  ``distill_*`` is the eval distillation loss (``None`` without
    a teacher).  ``merge_max_diff`` is the largest output difference between the adapter model
    and the merged model on one eval batch.  ``history`` has one dict per optimizer step.
    """

    model: nn.Module
    loss_before: float
    loss_after: float
    ppl_before: float | None
    ppl_after: float | None
    steps: int
    history: list[dict[str, float]]
    distill_before: float | None = None
    distill_after: float | None = None
    merge_max_diff: float | None = None
    target_modules: list[str] = dataclasses.field(default_factory=list)
    eval_on_train: bool = False


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

Example = dict[str, torch.Tensor]  # 1-D input_ids / attention_mask / labels
Batch = dict[str, torch.Tensor]  # 2-D tensors


def _as_columns(ds: Any) -> tuple[list[str], Callable[[str], list]]:
    """Column names and a column getter for a Dataset (or the 'train' split of a DatasetDict)."""
    ds = textdata.pick_split(ds)
    return list(ds.column_names), lambda name: list(ds[name])


def _require_tokenizer(tokenizer: Any, what: str) -> None:
    if tokenizer is None:
        raise DataError(f"{what} needs a tokenizer (pass tokenizer=), or pass ready batches of input_ids")


def _text_examples(texts: Sequence[str], tokenizer: Any, seq_len: int) -> list[Example]:
    """Concatenate tokenized texts (EOS between documents) and cut them into ``seq_len`` chunks.

    Packing avoids padding waste; the short tail is kept only if there is nothing else.
    """
    _require_tokenizer(tokenizer, "text data")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"text items must be strings, got {type(text).__name__}")
        ids = list(tokenizer(text)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        stream += ids
    if len(stream) < 2:
        raise DataError("the text data tokenizes to fewer than 2 tokens")
    chunks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    full = [c for c in chunks if len(c) == seq_len]
    chunks = full or [c for c in chunks if len(c) >= 2]
    return [_example(c, list(c)) for c in chunks]


def _alpaca_examples(
    instructions: Sequence[str], inputs: Sequence[str] | None, outputs: Sequence[str],
    tokenizer: Any, seq_len: int,
) -> list[Example]:
    """Alpaca-format examples; the loss is on the response only (prompt labels are -100)."""
    _require_tokenizer(tokenizer, "instruction data")
    eos = getattr(tokenizer, "eos_token_id", None)
    examples = []
    for i, (ins, out) in enumerate(zip(instructions, outputs)):
        ctx = (inputs[i] if inputs is not None else "") or ""
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if ctx else "",
            instruction=ins or "",
            input_block=f"### Input:\n{ctx}\n\n" if ctx else "",
        )
        p_ids = list(tokenizer(prompt)["input_ids"])
        r_ids = list(tokenizer(out or "", add_special_tokens=False)["input_ids"])
        if eos is not None:
            r_ids.append(eos)
        ids = (p_ids + r_ids)[:seq_len]
        labels = ([-100] * len(p_ids) + r_ids)[:seq_len]
        if len(ids) >= 2:
            examples.append(_example(ids, labels))
    if not examples:
        raise DataError("no instruction example has at least 2 tokens")
    return examples


def _example(ids: Sequence[int], labels: Sequence[int]) -> Example:
    ids_t = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": torch.tensor(labels, dtype=torch.long)}


def _dataset_examples(ds: Any, tokenizer: Any, seq_len: int) -> list[Example]:
    """Pick the format of a dataset from its fields: text, Alpaca instructions or token ids."""
    columns, col = _as_columns(ds)
    named = [f for f in textdata.TEXT_FIELDS if f in columns]
    if named:
        return _text_examples(col(named[0]), tokenizer, seq_len)
    if all(f in columns for f in INSTRUCTION_FIELDS):
        inputs = col("input") if "input" in columns else None
        return _alpaca_examples(col("instruction"), inputs, col("output"), tokenizer, seq_len)
    if "input_ids" in columns:
        return [_example(ids[:seq_len], ids[:seq_len]) for ids in col("input_ids") if len(ids) >= 2]
    try:
        field = textdata.text_field_of(columns, textdata.pick_split(ds).features)
    except DataError:
        raise DataError(
            f"the data has neither a text field (one of {list(textdata.TEXT_FIELDS)}) nor instruction "
            f"fields ({', '.join(repr(f) for f in INSTRUCTION_FIELDS)}, optional 'input'); "
            f"fields found: {columns}"
        ) from None
    return _text_examples(col(field), tokenizer, seq_len)


def _ready_batch(item: Mapping[str, Any], index: int) -> Batch:
    """Normalise a user batch: tensors, 2-D, a mask, and labels that ignore padding."""
    batch: Batch = {}
    for key, value in item.items():
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        batch[key] = t.unsqueeze(0) if t.dim() == 1 else t
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise DataError(f"batch {index}: input_ids must be an integer [batch, seq] tensor, got {tuple(ids.shape)} {ids.dtype}")
    batch.setdefault("attention_mask", torch.ones_like(ids))
    if "labels" not in batch:
        batch["labels"] = ids.masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad a list of examples into one batch (padding is masked and label-ignored)."""
    width = max(len(e["input_ids"]) for e in examples)
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    batch = {}
    for key, fill in fills.items():
        rows = [F.pad(e[key], (0, width - len(e[key])), value=fill) for e in examples]
        batch[key] = torch.stack(rows)
    return batch


@dataclasses.dataclass
class _Data:
    train: list[Batch]
    eval: list[Batch]
    eval_on_train: bool


def _split(items: list, eval_fraction: float, seed: int) -> tuple[list, list, bool]:
    """Deterministic shuffled split; with one item (or fraction 0) we evaluate on train."""
    if not 0.0 <= eval_fraction < 1.0:
        raise RecoveryError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    items = list(items)
    random.Random(seed).shuffle(items)
    n = len(items)
    if eval_fraction == 0 or n < 2:
        return items, items, True
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    return items[n_eval:], items[:n_eval], False


def _prepare_data(
    data: Any, tokenizer: Any, seq_len: int, batch_size: int, eval_fraction: float, seed: int
) -> _Data:
    """Turn any supported data form into train/eval lists of padded batches."""
    if seq_len < 2:
        raise RecoveryError(f"seq_len must be >= 2, got {seq_len}")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        data = ([textdata.read_text_file(path)] if path.suffix.lower() in textdata.TEXT_SUFFIXES
                else textdata.load_records(path))
    if textdata.is_dataset(data):
        examples = _dataset_examples(data, tokenizer, seq_len)
    elif isinstance(data, Mapping):
        if "input_ids" not in data:
            raise DataError(
                f"data is a dict without 'input_ids' (keys: {list(data)}); pass a list of batches, "
                "a list of strings, a Dataset or a file path"
            )
        return _Data([_ready_batch(data, 0)], [_ready_batch(data, 0)], True)  # one ready batch
    elif isinstance(data, Iterable):
        items = list(data)
        if not items:
            raise DataError("data is empty")
        if all(isinstance(x, str) for x in items):
            examples = _text_examples(items, tokenizer, seq_len)
        elif all(isinstance(x, Mapping) and "input_ids" in x for x in items):
            batches = [_ready_batch(x, i) for i, x in enumerate(items)]
            train, ev, on_train = _split(batches, eval_fraction, seed)
            return _Data(train, ev, on_train)
        elif all(isinstance(x, Mapping) for x in items):
            import datasets

            examples = _dataset_examples(datasets.Dataset.from_list(items), tokenizer, seq_len)
        else:
            kinds = sorted({type(x).__name__ for x in items})
            raise DataError(f"data items must be strings or dicts, got {kinds}")
    else:
        raise DataError(f"unsupported data type {type(data).__name__}")

    pad_id = _pad_id(tokenizer)
    train_ex, eval_ex, on_train = _split(examples, eval_fraction, seed)

    def batches(xs: list[Example]) -> list[Batch]:
        return [_collate(xs[i : i + batch_size], pad_id) for i in range(0, len(xs), batch_size)]

    return _Data(batches(train_ex), batches(eval_ex), on_train)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def _forward(model: nn.Module, batch: Batch) -> Any:
    """Call a model with the batch's inputs (never the labels: losses are computed here)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = _unwrap(model)
    inputs.update(cache_off(base))
    return model(**inputs)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a PeftModel (for signature checks)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _logits(out: Any) -> torch.Tensor | None:
    """Vocabulary logits ``[batch, seq, vocab]`` if the output has them."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 3 else None
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    return logits if isinstance(logits, torch.Tensor) and logits.dim() == 3 else None


def _embedding(out: Any, target: str) -> torch.Tensor:
    """Hidden states (``[b, s, h]``) or pooled embeddings (``[b, h]``) for encoder distillation."""
    if target == "pooled":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = _embedding(out, "hidden")
            return hidden.mean(dim=1)
        return pooled
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        hidden = out[0]
    if hidden is None and isinstance(out, torch.Tensor):
        hidden = out
    if hidden is None:
        raise RecoveryError("the model returns neither logits nor last_hidden_state; cannot distill")
    return hidden


def _output_heads(model: nn.Module, sample: Batch | None) -> set[int]:
    """Ids of the modules that produce the model output (LM head / classifier).

    Adapting the head buys little and risks the vocabulary projection, so it is excluded.  Two
    signals: ``get_output_embeddings()`` (HF LMs), and any linear layer whose output tensor *is*
    a tensor of the model output, found with forward hooks on one batch.
    """
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        with contextlib.suppress(Exception):
            head = get_out()
            if isinstance(head, nn.Module):
                heads.add(id(head))
    if sample is None:
        return heads
    # Weak references: holding every linear output alive would cost activation memory, and a
    # bare id() could be reused by a later tensor once an intermediate output is freed.
    produced: dict[int, tuple[weakref.ref, int]] = {}

    def record(mod: nn.Module, _inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (weakref.ref(out), id(mod))

    hooks = [m.register_forward_hook(record) for m in model.modules() if _is_linear_like(m)]
    try:
        with torch.no_grad():
            out = _forward(model, {k: v[:1] for k, v in sample.items()})
    finally:
        for h in hooks:
            h.remove()
    import torch.utils._pytree as pytree

    for leaf in pytree.tree_leaves(out):
        entry = produced.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
        if entry is not None and entry[0]() is leaf:
            heads.add(entry[1])
    return heads


def default_target_modules(model: nn.Module, sample: Batch | None = None) -> list[str]:
    """All linear layers except the output head, by full module name."""
    heads = _output_heads(model, sample)
    return [name for name, m in model.named_modules() if _is_linear_like(m) and id(m) not in heads]


@contextlib.contextmanager
def _borrowed(module: nn.Module | None, device: torch.device):
    """Use the teacher on ``device`` in eval mode, then give it back exactly as it was."""
    if module is None:
        yield None
        return
    flags = [(m, m.training) for m in module.modules()]
    first = next(iter(module.parameters()), None)
    orig_device = first.device if first is not None else device
    module.eval()
    if orig_device != device:
        module.to(device)
    try:
        yield module
    finally:
        if orig_device != device:
            module.to(orig_device)
        for m, flag in flags:
            m.training = flag


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _use_bf16(bf16: bool | str, device: torch.device) -> bool:
    if bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(bf16)


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing, which works with frozen base weights and LoRA adapters."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise RecoveryError(f"{type(model).__name__} has no gradient checkpointing support")


def _disable_checkpointing(model: nn.Module) -> None:
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        fn = getattr(model, name, None)
        if callable(fn):
            with contextlib.suppress(Exception):
                fn()
            return


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Objective:
    """The training objective and the matching eval metrics."""

    method: str
    teacher: nn.Module | None
    temperature: float
    alpha: float
    distill_loss: str
    distill_target: str

    def sums(self, out: Any, t_out: Any, batch: Batch) -> dict[str, tuple[torch.Tensor, float]]:
        """Per-term (sum of losses, count) so that eval averages are token-weighted."""
        terms: dict[str, tuple[torch.Tensor, float]] = {}
        logits = _logits(out)
        if logits is not None:
            terms["ce"] = _ce_sum(logits, batch["labels"])
        if t_out is not None:
            terms["kd"] = self._kd_sum(out, t_out, batch)
        return terms

    def _kd_sum(self, out: Any, t_out: Any, batch: Batch) -> tuple[torch.Tensor, float]:
        mask = batch["attention_mask"].bool()
        s_logits, t_logits = _logits(out), _logits(t_out)
        if s_logits is not None and t_logits is not None:
            if s_logits.shape != t_logits.shape:
                raise RecoveryError(f"student logits {tuple(s_logits.shape)} != teacher logits {tuple(t_logits.shape)}")
            return _kl_sum(s_logits, t_logits, mask, self.temperature)
        s, t = _embedding(out, self.distill_target), _embedding(t_out, self.distill_target)
        if s.shape != t.shape:
            raise RecoveryError(
                f"student output {tuple(s.shape)} != teacher output {tuple(t.shape)}: hidden-state "
                "distillation needs equal widths (prune heads/MLP channels, not the hidden size)"
            )
        return _hidden_sum(s, t, mask if s.dim() == 3 else None, self.distill_loss)

    def loss(self, terms: Mapping[str, tuple[torch.Tensor, float]]) -> torch.Tensor:
        """The scalar that is minimised, from mean terms."""
        mean = {k: v / max(n, 1.0) for k, (v, n) in terms.items()}
        if self.method == "lora":
            if "ce" not in mean:
                raise RecoveryError(
                    "method='lora' trains next-token loss and needs a model that returns logits; "
                    "for encoders use method='distill' with a teacher"
                )
            return mean["ce"]
        if self.method == "distill":
            return mean["kd"]
        if "ce" not in mean:
            raise RecoveryError("method='lora+distill' needs logits; use method='distill' for encoders")
        return (1.0 - self.alpha) * mean["ce"] + self.alpha * mean["kd"]


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Summed next-token cross-entropy (position t predicts label t+1) and its token count."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    n = float((shift_labels != -100).sum())
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=-100, reduction="sum",
    )
    return total, n


def _kl_sum(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temp: float) -> tuple[torch.Tensor, float]:
    """Summed ``T^2 * KL(p_teacher || p_student)`` over non-padding tokens (Hinton et al.)."""
    log_p_s = F.log_softmax(s.float() / temp, dim=-1)
    log_p_t = F.log_softmax(t.float() / temp, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temp**2
    mask = mask.to(kl.device)
    return (kl * mask).sum(), float(mask.sum())


def _hidden_sum(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None, kind: str) -> tuple[torch.Tensor, float]:
    """Summed per-token (or per-example) MSE or cosine distance between embeddings."""
    s, t = s.float(), t.float()
    if kind == "mse":
        per = ((s - t) ** 2).mean(-1)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise RecoveryError(f"distill_loss must be 'mse' or 'cosine', got {kind!r}")
    if mask is None:
        return per.sum(), float(per.numel())
    mask = mask.to(per.device)
    return (per * mask).sum(), float(mask.sum())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _teacher_out(teacher: nn.Module | None, batch: Batch, amp: bool, device: torch.device) -> Any:
    if teacher is None:
        return None
    with torch.no_grad(), _autocast(device, amp):
        return _forward(teacher, batch)


def _evaluate(
    model: nn.Module, batches: Sequence[Batch], objective: _Objective, device: torch.device, amp: bool
) -> dict[str, float]:
    """Token-weighted eval metrics: ``ce``/``ppl`` when there are logits, ``kd`` with a teacher."""
    was_training = model.training
    model.eval()
    totals: dict[str, list[float]] = {}
    try:
        for batch in batches:
            batch = _to(batch, device)
            with torch.no_grad(), _autocast(device, amp):
                out = _forward(model, batch)
                t_out = _teacher_out(objective.teacher, batch, amp, device)
                for key, (value, n) in objective.sums(out, t_out, batch).items():
                    acc = totals.setdefault(key, [0.0, 0.0])
                    acc[0] += float(value)
                    acc[1] += n
    finally:
        model.train(was_training)
    metrics = {k: s / max(n, 1.0) for k, (s, n) in totals.items()}
    if "ce" in metrics:
        metrics["ppl"] = math.exp(min(metrics["ce"], 50.0))
    return metrics


@dataclasses.dataclass
class _TrainConfig:
    epochs: int
    max_steps: int | None
    lr: float
    grad_accum: int
    warmup_ratio: float
    max_grad_norm: float
    amp: bool
    progress: bool
    seed: int


def _total_steps(n_batches: int, cfg: _TrainConfig) -> int:
    per_epoch = math.ceil(n_batches / cfg.grad_accum)
    return cfg.max_steps if cfg.max_steps is not None else per_epoch * cfg.epochs


def _train(
    model: nn.Module, batches: Sequence[Batch], objective: _Objective, device: torch.device,
    cfg: _TrainConfig, label: str,
) -> list[dict[str, float]]:
    """AdamW + cosine schedule with linear warmup, gradient accumulation, clipping, tqdm."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecoveryError("no trainable parameters (check target_modules)")
    total = _total_steps(len(batches), cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = int(round(cfg.warmup_ratio * total))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max(total, 1))
    history: list[dict[str, float]] = []
    order = random.Random(cfg.seed)
    bar = tqdm(total=total, desc=f"fxprune recover [{label}]", disable=not cfg.progress)
    model.train()
    step, micro, running = 0, 0, {}
    try:
        while step < total:
            epoch = list(range(len(batches)))
            order.shuffle(epoch)
            for idx in epoch:
                batch = _to(batches[idx], device)
                # method="lora" trains on labels only; a teacher then just reports eval KD
                teacher = objective.teacher if objective.method != "lora" else None
                t_out = _teacher_out(teacher, batch, cfg.amp, device)
                with _autocast(device, cfg.amp):
                    terms = objective.sums(_forward(model, batch), t_out, batch)
                    loss = objective.loss(terms)
                if not torch.isfinite(loss):
                    raise RecoveryError(f"loss became {float(loss)} at step {step}; lower lr (now {cfg.lr})")
                (loss / cfg.grad_accum).backward()
                _accumulate(running, loss, terms)
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                record = _optimizer_step(params, optimizer, scheduler, cfg, running, step)
                history.append(record)
                running, step = {}, step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if step >= total:
                    break
            if micro % cfg.grad_accum and step < total:  # epoch ended mid-accumulation
                history.append(_optimizer_step(params, optimizer, scheduler, cfg, running, step))
                running, step, micro = {}, step + 1, 0
                bar.update(1)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    return history


def _accumulate(running: dict[str, list[float]], loss: torch.Tensor, terms: Mapping[str, tuple[torch.Tensor, float]]) -> None:
    entry = running.setdefault("loss", [0.0, 0.0])
    entry[0] += float(loss.detach())
    entry[1] += 1
    for key, (value, n) in terms.items():
        acc = running.setdefault(key, [0.0, 0.0])
        acc[0] += float(value.detach())
        acc[1] += n


def _optimizer_step(params, optimizer, scheduler, cfg: _TrainConfig, running, step: int) -> dict[str, float]:
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    record = {"step": float(step + 1), "lr": float(lr)}
    for key, (value, n) in running.items():
        record[key] = value / max(n, 1.0)
    return record


def _merge(peft_model: nn.Module, sample: Batch | None, device: torch.device) -> tuple[nn.Module, float | None]:
    """Merge adapters into plain weights and measure how much the outputs moved (should be ~0)."""
    before = None
    peft_model.eval()
    if sample is not None:
        with torch.no_grad():
            before = tensor_leaves(_forward(peft_model, _to(sample, device)), floating=True)
    merged = peft_model.merge_and_unload()
    merged.eval()
    if before is None:
        return merged, None
    with torch.no_grad():
        after = tensor_leaves(_forward(merged, _to(sample, device)), floating=True)
    diff = max((float((a - b).abs().max()) for a, b in zip(before, after) if a.numel()), default=0.0)
    return merged, diff


def _validate(method: str, teacher: nn.Module | None, temperature: float, alpha: float, grad_accum: int, batch_size: int) -> None:
    if method not in METHODS:
        raise RecoveryError(f"method must be one of {METHODS}, got {method!r}")
    if "distill" in method and teacher is None:
        raise RecoveryError(f"method={method!r} needs teacher= (the dense model)")
    if temperature <= 0:
        raise RecoveryError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise RecoveryError(f"alpha must be in [0, 1], got {alpha}")
    if grad_accum < 1 or batch_size < 1:
        raise RecoveryError("grad_accum and batch_size must be >= 1")


def recover(
    model: nn.Module,
    data: Any,
    *,
    method: str = "lora",
    teacher: nn.Module | None = None,
    tokenizer: Any = None,
    seq_len: int = 128,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 2e-4,
    batch_size: int = 4,
    grad_accum: int = 1,
    eval_fraction: float = 0.1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    bf16: bool | str = "auto",
    gradient_checkpointing: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    temperature: float = 1.0,
    alpha: float = 0.5,
    distill_loss: str = "mse",
    distill_target: str = "hidden",
    warmup_ratio: float = 0.05,
    max_grad_norm: float = 1.0,
) -> RecoveryResult:
    """Fine-tune a (pruned) model with LoRA and return the merged plain model.

    ``data`` may be: a path to a ``.txt`` file (packed into ``seq_len`` chunks), a ``.json`` /
    ``.jsonl`` / ``.csv`` / ``.parquet`` file, a list of strings, a ``datasets.Dataset`` with a
    ``text`` field or Alpaca fields (``instruction``, optional ``input``, ``output``; loss on the
    response only), or an iterable of ready batches ``{"input_ids", "attention_mask"[, "labels"]}``
    (no tokenizer needed; each item is one batch).  An iterable is consumed once.

    ``method``: ``"lora"`` (next-token loss), ``"distill"`` (KD to ``teacher`` only; hidden-state
    MSE/cosine for encoders without logits), or ``"lora+distill"`` (``(1-alpha)*CE + alpha*KD``),
    see the module docstring; with ``"lora"`` a teacher, if given, only reports eval KD.  ``target_modules=None`` adapts every linear layer except the
    output head.  ``max_steps`` (optimizer steps) overrides ``epochs``.  ``bf16="auto"`` uses bf16
    autocast on GPUs that support it.

    The input ``model`` is deep-copied and never modified; the teacher runs in eval/no_grad mode
    and is returned to its original mode and device.  The returned model lives on ``device`` in
    eval mode.
    """
    _validate(method, teacher, temperature, alpha, grad_accum, batch_size)
    dev = _resolve_device(device)
    amp = _use_bf16(bf16, dev)
    prepared = _prepare_data(data, tokenizer, seq_len, batch_size, eval_fraction, seed)
    if not prepared.train:
        raise DataError("no training batches could be built from the data")

    cuda_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), _borrowed(teacher, dev) as t_model:
        torch.manual_seed(seed)
        student = copy.deepcopy(model).to(dev)
        objective = _Objective(method, t_model, temperature, alpha, distill_loss, distill_target)
        sample = _to(prepared.train[0], dev)
        before = _evaluate(student, prepared.eval, objective, dev, amp)
        peft_model, targets = _wrap_lora(
            student, sample, target_modules, modules_to_save, lora_r, lora_alpha, lora_dropout, gradient_checkpointing
        )
        cfg = _TrainConfig(epochs, max_steps, lr, grad_accum, warmup_ratio, max_grad_norm, amp, progress, seed)
        history = _train(peft_model, prepared.train, objective, dev, cfg, method)
        after = _evaluate(peft_model, prepared.eval, objective, dev, amp)
        if gradient_checkpointing:
            _disable_checkpointing(_unwrap(peft_model))
        merged, merge_diff = _merge(peft_model, prepared.eval[0] if prepared.eval else None, dev)

    key = "ce" if "ce" in before else "kd"
    return RecoveryResult(
        model=merged, loss_before=before[key], loss_after=after[key],
        ppl_before=before.get("ppl"), ppl_after=after.get("ppl"), steps=len(history),
        history=history, distill_before=before.get("kd"), distill_after=after.get("kd"),
        merge_max_diff=merge_diff, target_modules=targets, eval_on_train=prepared.eval_on_train,
    )


def _wrap_lora(
    student: nn.Module, sample: Batch, target_modules: Sequence[str] | str | None,
    modules_to_save: Sequence[str] | None, r: int, lora_alpha: int, dropout: float, checkpointing: bool,
) -> tuple[nn.Module, list[str]]:
    """Attach LoRA adapters via peft; adapters are sized from each layer's own in/out features."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - environment dependent
        raise RecoveryError("recover() needs peft (pip install fxprune[peft])") from exc
    if target_modules is None:
        student.eval()
        targets = default_target_modules(student, sample)
        if not targets:
            raise RecoveryError(f"{type(student).__name__} has no linear layers for LoRA besides its output head")
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if checkpointing:
        _enable_checkpointing(student)
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=dropout,
        target_modules=targets if not isinstance(target_modules, str) else target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    try:
        peft_model = get_peft_model(student, config)
    except ValueError as exc:
        raise RecoveryError(f"peft could not attach LoRA adapters: {exc}") from exc
    return peft_model, targets


def shot_lora(model: nn.Module, batches: Sequence[Any], steps: int, *, seed: int = 0,
              device: str | torch.device = "auto") -> RecoveryResult:
    """The LLM Surgeon's interleaved LoRA between shots: rank 8, lr 1e-4, ``steps`` optimizer
    steps on the (ready) calibration batches, merged into plain weights.

    ``model`` is the pruned model of a shot, already sliced, so the adapters are sized to the
    surviving rows and columns and cannot revive removed structures (the paper masks LoRA's A
    columns and B rows where the base weight was pruned; here those rows and columns do not exist).
    """
    return recover(model, list(batches), method="lora", max_steps=int(steps), lr=1e-4, lora_r=8, lora_alpha=16,
                   lora_dropout=0.0, batch_size=1, eval_fraction=0.0, seed=seed, progress=False, device=device,
                   warmup_ratio=0.0)
