"""Text and records from local files, with one meaning everywhere (calibration, eval, recovery).

* ``.txt`` / ``.text`` / ``.md``: **one document**, the whole file, tokenised whole and cut into
  windows.  (A code file or a book is one text; its lines are not independent samples.)
* ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv``: **records**.  Each record's text is its text
  field (``text_field=``, else the first of :data:`TEXT_FIELDS` present, else the only string
  column); recovery also accepts Alpaca records (``instruction``, optional ``input``, ``output``).

Bad files fail with a :class:`~fxprune.errors.DataError` that names the file and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from fxprune.errors import DataError

__all__ = [
    "TEXT_FIELDS", "INSTRUCTION_FIELDS", "TEXT_SUFFIXES", "RECORD_SUFFIXES", "SUPPORTED_SUFFIXES",
    "check_data_file", "read_text_file", "load_records", "text_field_of", "documents_from",
]

TEXT_FIELDS = ("text", "content", "document", "sentence", "article", "body", "story", "code")
"""Record fields tried, in order, when ``text_field`` is not given."""

INSTRUCTION_FIELDS = ("instruction", "output")
"""Fields that make a record an Alpaca-style instruction (``input`` is optional)."""

TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SUPPORTED_SUFFIXES = tuple(sorted(set(TEXT_SUFFIXES) | set(RECORD_SUFFIXES)))

DATA_FILE_HELP = (
    ".txt/.text/.md = one document (the whole file, tokenised and cut into windows); "
    ".json/.jsonl/.parquet/.csv = records with a text field (or Alpaca instruction/input/output "
    "fields for recover)"
)


def check_data_file(path: str | os.PathLike, what: str = "data file", *, deep: bool = False) -> Path:
    """Everything about a data file that can be checked before a model is loaded.

    Raises DataError naming the file: missing, a directory, unreadable, empty, an unsupported
    suffix, or (for text files) not UTF-8 text in its first 64 KiB.  ``deep=True`` (the CLI's
    up-front check) also reads the whole file once: all of a text file must be UTF-8 without NUL
    bytes, and a record file must parse and hold records with a string field.  The file is
    recorded as an input (no output of this process may replace it).
    """
    from fxprune.util.publish import note_input

    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} {os.fspath(path)} does not exist")
    if p.is_dir():
        raise DataError(f"{what} {os.fspath(path)} is a directory; pass a file")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"unsupported {what} type {suffix or '(no suffix)'!r} for {os.fspath(path)}; use one of "
            f"{', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not os.access(p, os.R_OK):
        raise DataError(f"{what} {os.fspath(path)} is not readable (permissions)")
    if p.stat().st_size == 0:
        raise DataError(f"{what} {os.fspath(path)} is empty")
    with open(p, "rb") as f:
        head = f.read(65536)
    if suffix in TEXT_SUFFIXES or suffix in (".json", ".jsonl", ".csv"):
        _check_utf8(head, p, what, complete=p.stat().st_size <= len(head))
    elif suffix == ".parquet" and not head.startswith(b"PAR1"):
        raise DataError(f"{what} {os.fspath(path)} is not a parquet file (no PAR1 magic bytes)")
    note_input(p)
    if deep:
        _check_contents(p, suffix, what)
    return p


def _check_contents(p: Path, suffix: str, what: str) -> None:
    """Read the whole file once: UTF-8 text, or records that parse and carry a string field."""
    import codecs
    import json

    if suffix == ".parquet":
        with open(p, "rb") as f:
            f.seek(max(0, p.stat().st_size - 4))
            if f.read(4) != b"PAR1":
                raise DataError(f"{what} {p} is a truncated parquet file (no PAR1 footer)")
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    chunks = []
    with open(p, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            nul = block.find(b"\x00")
            if nul >= 0:
                raise DataError(f"{what} {p} looks binary (it contains NUL bytes at offset {offset + nul}), "
                                "not UTF-8 text")
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise DataError(f"{what} {p} is not UTF-8 text (invalid byte at offset {offset + exc.start})") from None
            offset += len(block)
            if suffix != ".txt" and suffix not in TEXT_SUFFIXES:
                chunks.append(text)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{what} {p} is not UTF-8 text (it ends inside a character)") from None
    if suffix in TEXT_SUFFIXES:
        return
    body = "".join(chunks)
    first: Any = None
    if suffix == ".jsonl" or (suffix == ".json" and not body.lstrip().startswith(("[", "{"))):
        for n, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{what} {p}: line {n} is not JSON ({exc.msg})") from None
            first = rec if first is None else first
        if first is None:
            raise DataError(f"{what} {p} has no records")
    elif suffix == ".json":
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            try:  # JSON lines in a .json file are read as such by the loader
                first = json.loads(body.lstrip().splitlines()[0])
            except (json.JSONDecodeError, IndexError):
                raise DataError(f"{what} {p} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        else:
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"data": [...]}, as datasets reads it
            if isinstance(data, list):
                if not data:
                    raise DataError(f"{what} {p} has no records")
                first = data[0]
            elif isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                first = {k: (v[0] if v else None) for k, v in data.items()}
            else:
                raise DataError(f"{what} {p} holds a JSON {type(data).__name__}, not records (a list of objects)")
    elif suffix == ".csv":
        import csv
        import io

        rows = csv.reader(io.StringIO(body))
        header = next(rows, None)
        row = next(rows, None)
        if not header or row is None:
            raise DataError(f"{what} {p} has no records (a header and at least one row are needed)")
        first = dict(zip(header, row, strict=False))
    if not isinstance(first, dict):
        raise DataError(f"{what} {p}: records must be JSON objects with a text field, got {type(first).__name__}")
    if not any(isinstance(v, str) for v in first.values()):
        raise DataError(f"{what} {p}: its records have no string field to read text from "
                        f"(fields: {sorted(first)}); expected one of {list(TEXT_FIELDS)}")


def _check_utf8(data: bytes, path: Path, what: str, complete: bool) -> None:
    if b"\x00" in data:
        raise DataError(f"{what} {path} looks binary (it contains NUL bytes), not UTF-8 text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not complete and exc.start >= len(data) - 4:  # a character cut at the 64 KiB boundary
            return
        raise DataError(f"{what} {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_text_file(path: str | os.PathLike, what: str = "data file") -> str:
    """The whole file as one document."""
    p = check_data_file(path, what)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {p} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def load_records(path: str | os.PathLike, what: str = "data file") -> Any:
    """A record file as a ``datasets.Dataset`` (no hub access: only the packaged builders)."""
    p = check_data_file(path, what)
    builder = RECORD_SUFFIXES.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"{what} {p} is a text file, not a record file")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - optional extra
        raise DataError(f"reading {p} needs the 'datasets' package (pip install fxprune[datasets])") from exc
    bars_were_on = not datasets.are_progress_bars_disabled()
    try:
        datasets.disable_progress_bars()
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # noqa: BLE001 - malformed JSON / parquet / CSV
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not read {what} {p} as {builder} records: {reason}") from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if len(ds) == 0:
        raise DataError(f"{what} {p} has no records")
    return ds


def text_field_of(columns: Sequence[str], features: Any = None, text_field: str | None = None,
                  where: str = "the data") -> str:
    """The column to read text from: explicit, a well-known name, or the only string column."""
    names = list(columns)
    if text_field is not None:
        if text_field not in names:
            raise DataError(f"text field {text_field!r} not found; fields seen in {where}: {names}")
        return text_field
    for name in TEXT_FIELDS:
        if name in names:
            return name
    strings = [n for n in names if getattr((features or {}).get(n), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise DataError(
        f"no text field found; fields seen: {names} (in {where}). Pass text_field= one of them "
        f"(tried {list(TEXT_FIELDS)})"
    )


def documents_from(source: Any, text_field: str | None = None, what: str = "data file") -> list[str]:
    """Documents from a path (see the module docs), a ``datasets.Dataset`` or a list of strings."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix.lower() in TEXT_SUFFIXES:
            return [read_text_file(p, what)]
        ds = load_records(p, what)
        field = text_field_of(ds.column_names, ds.features, text_field, where=str(p))
        return [t for t in ds[field] if isinstance(t, str)]
    if is_dataset(source):
        ds = pick_split(source)
        if len(ds) == 0:
            raise DataError("the dataset has no rows")
        field = text_field_of(ds.column_names, ds.features, text_field)
        return [t for t in ds[field] if isinstance(t, str)]
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        return list(source)
    raise DataError(f"expected a file path, a datasets.Dataset or a list of strings, got {type(source).__name__}")


def is_dataset(obj: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - optional extra
        return False
    return isinstance(obj, (datasets.Dataset, datasets.DatasetDict))


def pick_split(ds: Any) -> Any:
    """A Dataset, or the ``train`` split (else the first split) of a DatasetDict."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise DataError("the DatasetDict has no splits")
        return ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds
