"""Recovery fine-tuning: LoRA lowers the loss, merging is exact, distillation lowers the KL."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("peft")

from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fxprune.errors import DataError, FxpruneError  # noqa: E402
from fxprune.passes.recovery import RecoveryError, default_target_modules, recover  # noqa: E402
from tests.helpers_tok import make_tokenizer  # noqa: E402

REPETITIVE = ["the cat sat on the mat . the dog sat on the log ."] * 40


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def tiny_llama(vocab: int, seed: int = 0, intermediate: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return LlamaForCausalLM(cfg)


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def random_batches(vocab: int, n: int, seed: int = 0, batch: int = 4, seq: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(4, vocab, (batch, seq), generator=g)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    return out


# ---------------------------------------------------------------------------------------------


def test_lora_lowers_loss_merges_exactly_and_leaves_input_alone(tok):
    model = tiny_llama(len(tok))
    saved = state_copy(model)
    res = recover(model, REPETITIVE, tokenizer=tok, seq_len=16, max_steps=30, lr=1e-2, progress=False)
    assert res.steps == 30 and len(res.history) == 30
    assert res.loss_after < res.loss_before - 0.3, (res.loss_before, res.loss_after)
    assert res.ppl_after < res.ppl_before
    # merged plain model == adapter model on an eval batch
    assert res.merge_max_diff is not None and res.merge_max_diff < 1e-5
    assert type(res.model) is LlamaForCausalLM
    assert not any("lora" in n for n, _ in res.model.named_modules())
    # the head is excluded from LoRA; every other linear is adapted
    assert "lm_head" not in res.target_modules and len(res.target_modules) == 2 * 7
    assert_same_state(model, saved)
    assert model.training  # untouched (HF models are built in train mode)


def test_merged_model_reproduces_the_reported_eval_loss(tok):
    """Independent of the built-in check: recompute the eval loss on the merged model."""
    model = tiny_llama(len(tok))
    batches = [
        {"input_ids": torch.tensor([tok(REPETITIVE[0])["input_ids"][:16]] * 2)} for _ in range(4)
    ]
    res = recover(model, batches, max_steps=5, lr=5e-3, eval_fraction=0.25, progress=False)
    ev = batches[0]["input_ids"]
    with torch.no_grad():
        logits = res.model(input_ids=ev).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ev[:, 1:].reshape(-1))
    assert float(ce) == pytest.approx(res.loss_after, rel=1e-4)


def test_distill_lowers_kl_without_labels(tok):
    vocab = len(tok)
    teacher = tiny_llama(vocab, seed=0).eval()
    student = tiny_llama(vocab, seed=1, intermediate=48)  # a "pruned" student: smaller MLP
    t_saved = state_copy(teacher)
    res = recover(
        student, random_batches(vocab, 10), method="distill", teacher=teacher,
        max_steps=30, lr=1e-2, temperature=2.0, progress=False,
    )
    assert res.distill_after < 0.8 * res.distill_before, (res.distill_before, res.distill_after)
    assert_same_state(teacher, t_saved)
    assert not teacher.training
    assert all(set(h) >= {"loss", "kd", "lr"} for h in res.history)


def test_lora_plus_distill_combines_terms(tok):
    vocab = len(tok)
    teacher = tiny_llama(vocab, seed=0)
    teacher.train()
    res = recover(
        tiny_llama(vocab, seed=1), REPETITIVE, tokenizer=tok, method="lora+distill", teacher=teacher,
        alpha=0.3, seq_len=16, max_steps=4, progress=False,
    )
    h = res.history[-1]
    assert h["loss"] == pytest.approx(0.7 * h["ce"] + 0.3 * h["kd"], rel=1e-4)
    assert teacher.training  # mode restored after the no-grad eval-mode use


def test_encoder_distills_on_hidden_states():
    cfg = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    teacher = BertModel(cfg).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # damage the student's FFN the way heavy pruning would
        student.encoder.layer[0].intermediate.dense.weight.normal_(0, 0.5)
        student.encoder.layer[0].output.dense.weight.normal_(0, 0.5)
    for loss in ("mse", "cosine"):
        res = recover(
            student, random_batches(50, 6), method="distill", teacher=teacher, distill_loss=loss,
            max_steps=15, lr=1e-2, progress=False,
        )
        assert res.ppl_before is None and res.loss_before == res.distill_before
        assert res.loss_after < res.loss_before, (loss, res.loss_before, res.loss_after)
    with pytest.raises(RecoveryError, match="logits"):
        recover(student, random_batches(50, 2), method="lora", max_steps=1, progress=False)


def test_pruned_like_llama_with_uneven_layers(tok):
    """peft sizes adapters from each layer's own features, so uneven layers just work."""
    model = tiny_llama(len(tok))
    mlp = model.model.layers[0].mlp
    keep = torch.arange(40)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = torch.nn.Linear(old.in_features, 40, bias=False)
        new.weight.data = old.weight.data[keep].clone()
        setattr(mlp, name, new)
    down = torch.nn.Linear(40, mlp.down_proj.out_features, bias=False)
    down.weight.data = mlp.down_proj.weight.data[:, keep].clone()
    mlp.down_proj = down
    res = recover(model, REPETITIVE, tokenizer=tok, seq_len=16, max_steps=3, progress=False)
    assert res.model.model.layers[0].mlp.up_proj.out_features == 40
    assert res.model.model.layers[1].mlp.up_proj.out_features == 64


def test_alpaca_jsonl_masks_the_prompt(tmp_path, tok):
    rows = [
        {"instruction": "say hello", "input": "", "output": "hello"},
        {"instruction": "add two numbers", "input": "one two", "output": "three"},
        {"instruction": "repeat the word", "input": "cat", "output": "cat cat"},
    ] * 4
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    res = recover(tiny_llama(len(tok)), str(path), tokenizer=tok, seq_len=64, max_steps=2, batch_size=2, progress=False)
    assert res.steps == 2 and res.loss_before > 0

    from fxprune.passes.recovery import _prepare_data

    data = _prepare_data(str(path), tok, 64, 2, 0.0, 0)
    labels = data.train[0]["labels"]
    ids = data.train[0]["input_ids"]
    for row_ids, row_labels in zip(ids, labels):
        kept = row_labels[row_labels != -100].tolist()
        assert kept and kept[-1] == tok.eos_token_id  # response + EOS only
        assert len(kept) < int((row_ids != tok.pad_token_id).sum())  # the prompt is masked


def test_text_file_and_dataset_inputs(tmp_path, tok):
    import datasets

    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(REPETITIVE[:10]))
    r1 = recover(tiny_llama(len(tok)), txt, tokenizer=tok, seq_len=16, max_steps=1, progress=False)
    ds = datasets.Dataset.from_dict({"text": REPETITIVE[:10], "id": list(range(10))})
    r2 = recover(tiny_llama(len(tok)), ds, tokenizer=tok, seq_len=16, max_steps=1, progress=False)
    assert r1.steps == r2.steps == 1


def test_default_targets_find_head_without_get_output_embeddings():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.body = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 20)

        def forward(self, input_ids, attention_mask=None):
            return self.out(torch.relu(self.body(self.emb(input_ids))))

    sample = {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    assert default_target_modules(Plain(), sample) == ["body"]
    res = recover(Plain(), random_batches(20, 4, seq=6), max_steps=2, progress=False)
    assert res.target_modules == ["body"]


# --- bad inputs -------------------------------------------------------------------------------


def test_missing_data_file_names_the_path(tmp_path, tok):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="train.jsonl"):
        recover(tiny_llama(len(tok)), str(missing), tokenizer=tok, progress=False)


def test_dataset_without_text_or_instruction_fields(tmp_path, tok):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": "a2"}\n')
    with pytest.raises(DataError, match=r"fields found: \['question', 'answer'\]"):
        recover(tiny_llama(len(tok)), path, tokenizer=tok, progress=False)


def test_other_bad_arguments(tok):
    model = tiny_llama(len(tok))
    with pytest.raises(DataError, match="tokenizer"):
        recover(model, ["some text"], progress=False)
    with pytest.raises(RecoveryError, match="teacher"):
        recover(model, random_batches(len(tok), 2), method="distill", progress=False)
    with pytest.raises(RecoveryError, match="method"):
        recover(model, random_batches(len(tok), 2), method="sft", progress=False)
    with pytest.raises(DataError, match="unsupported data file"):
        recover(model, __file__, progress=False)
    with pytest.raises(FxpruneError):
        recover(model, [], progress=False)
