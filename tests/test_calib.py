"""Calibration loading from every supported source, and clear errors for bad data."""

from __future__ import annotations

import json

import pytest
import torch

from fxprune.calib import load_calibration
from fxprune.errors import DataError
from tests.helpers_text import corpus, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _check_batches(batches, *, n_samples: int, seq_len: int, batch_size: int, vocab: int) -> None:
    assert sum(b["input_ids"].shape[0] for b in batches) == n_samples
    assert all(b["input_ids"].shape[0] <= batch_size for b in batches)
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape[1] == seq_len
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
        assert int(b["input_ids"].min()) >= 0 and int(b["input_ids"].max()) < vocab


def test_list_of_strings(tok) -> None:
    batches = load_calibration(corpus(), tokenizer=tok, n_samples=5, seq_len=16, batch_size=2)
    assert len(batches) == 3
    _check_batches(batches, n_samples=5, seq_len=16, batch_size=2, vocab=len(tok))
    # windows are disjoint slices of the concatenated text, so no id is unknown
    assert all(int((b["input_ids"] == tok.unk_token_id).sum()) == 0 for b in batches)


def test_seeded(tok) -> None:
    def ids(seed):
        return torch.cat([b["input_ids"] for b in load_calibration(corpus(), tokenizer=tok, n_samples=4, seq_len=8, seed=seed)])

    assert torch.equal(ids(0), ids(0))
    assert not torch.equal(ids(0), ids(1))


def test_dataset_with_autodetected_and_explicit_field(tok) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"id": list(range(len(corpus()))), "content": corpus()})
    batches = load_calibration(ds, tokenizer=tok, n_samples=3, seq_len=12)
    _check_batches(batches, n_samples=3, seq_len=12, batch_size=1, vocab=len(tok))
    ds2 = datasets.Dataset.from_dict({"prompt": corpus(), "answer": corpus()})
    batches = load_calibration(ds2, tokenizer=tok, n_samples=3, seq_len=12, text_field="answer")
    assert len(batches) == 3
    dd = datasets.DatasetDict({"validation": ds, "train": ds})
    assert len(load_calibration(dd, tokenizer=tok, n_samples=2, seq_len=12)) == 2


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".parquet"])
def test_local_files(tok, tmp_path, suffix: str) -> None:
    path = tmp_path / f"calib{suffix}"
    rows = [{"text": t, "n": i} for i, t in enumerate(corpus())]
    if suffix == ".txt":
        path.write_text("\n".join(corpus()))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    batches = load_calibration(str(path), tokenizer=tok, n_samples=4, seq_len=10, batch_size=4)
    _check_batches(batches, n_samples=4, seq_len=10, batch_size=4, vocab=len(tok))


def test_ready_batches_pass_through_truncated() -> None:
    ready = [{"input_ids": torch.arange(12).view(3, 4)} for _ in range(3)]
    out = load_calibration(ready, n_samples=5)
    assert [b["input_ids"].shape[0] for b in out] == [3, 2]
    assert out[0] is ready[0]
    gen = (torch.zeros(2, 4, dtype=torch.long) for _ in range(10))
    assert len(load_calibration(gen, n_samples=3)) == 2
    tuples = [(torch.zeros(4, 8), torch.ones(4)) for _ in range(2)]
    out = load_calibration(tuples, n_samples=6)
    assert out[1][0].shape == (2, 8) and out[1][1].shape == (2,)


def test_missing_file(tok, tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_calibration(str(tmp_path / "nope.jsonl"), tokenizer=tok)


@pytest.mark.parametrize("empty", [[], [""], ["   ", "\n"]])
def test_empty_data(tok, empty) -> None:
    with pytest.raises(DataError, match="empty"):
        load_calibration(empty, tokenizer=tok)


def test_empty_file_and_empty_dataset(tok, tmp_path) -> None:
    import datasets

    path = tmp_path / "e.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_calibration(path, tokenizer=tok)
    with pytest.raises(DataError, match="no rows"):
        load_calibration(datasets.Dataset.from_dict({"text": []}), tokenizer=tok)


def test_no_text_field_lists_fields(tok) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"a": ["x y"], "b": ["z"], "n": [1]})
    with pytest.raises(DataError, match=r"no text field found; fields seen: \['a', 'b', 'n'\]"):
        load_calibration(ds, tokenizer=tok)
    with pytest.raises(DataError, match=r"'body' not found; fields seen"):
        load_calibration(ds, tokenizer=tok, text_field="body")


def test_too_little_text(tok) -> None:
    with pytest.raises(DataError, match="too little calibration text: 4 tokens, need at least seq_len=16"):
        load_calibration(["the quick brown fox"], tokenizer=tok, seq_len=16)


def test_overlapping_windows_warn(tok) -> None:
    with pytest.warns(UserWarning, match="overlap"):
        out = load_calibration(["the quick brown fox jumps over the lazy dog"], tokenizer=tok, n_samples=4, seq_len=6)
    assert len(out) == 4


def test_other_bad_inputs(tok, tmp_path) -> None:
    with pytest.raises(DataError, match="needs a tokenizer"):
        load_calibration(corpus())
    bad = tmp_path / "x.xml"
    bad.write_text("<a/>\n")
    with pytest.raises(DataError, match="unsupported calibration file type"):
        load_calibration(bad, tokenizer=tok)
    with pytest.raises(DataError, match="n_samples must be a positive integer"):
        load_calibration(corpus(), tokenizer=tok, n_samples=0)
    with pytest.raises(DataError, match="unsupported calibration source"):
        load_calibration(42)
