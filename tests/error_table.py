"""The table of bad inputs and what the CLI prints for them: test data and README source at once.

Each row is one test (``tests/test_errors.py`` runs the command and checks the exit code and the
message) and one line of the README's error table, which is generated from these rows:

    python -m tests.error_table            # rewrite the README section between the markers

A message is a template: ``{name}`` is a path of the test world (shown in the README as
``NAME``), ``*`` matches anything.  The world (:func:`build_world`) holds a tiny Llama with a
tokenizer and broken copies of it, and bad data files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- error-table:start -->", "<!-- error-table:end -->"


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    bad_input: str  # what the user got wrong, in words
    command: str  # the fxprune command line, with {placeholders}
    code: int
    message: str  # the one line after "fxprune: error: ", with {placeholders} and * wildcards


ROWS: tuple[Row, ...] = (
    # -- the model --------------------------------------------------------------------------
    Row("missing-model", "model path does not exist", "prune {missing} --ratio 0.2", 2,
        "model path {missing} does not exist (expected a local HF directory or module:factory)"),
    Row("no-config", "a directory without config.json", "prune {noconf} --ratio 0.2", 2,
        "{noconf} has no config.json: not a Hugging Face model directory (expected config.json and "
        "model.safetensors, or a directory written by fxprune)"),
    Row("bad-config", "config.json is not JSON", "prune {badconfig} --ratio 0.2", 2,
        "{badconfig}/config.json is not valid JSON (*)"),
    Row("no-weights", "config.json but no weights", "prune {noweights} --ratio 0.2", 2,
        "{noweights} has a config.json but no weights (model.safetensors, pytorch_model.bin)"),
    Row("truncated-weights", "a truncated model.safetensors", "prune {trunc} --ratio 0.2", 2,
        "weights file {trunc}/model.safetensors is truncated: its tensors need * bytes of data, the file "
        "holds * (an interrupted download or copy?)"),
    Row("bad-factory", "module:factory that does not import", "prune nosuchmodule:make --ratio 0.2", 2,
        "cannot import 'nosuchmodule' for nosuchmodule:make: No module named 'nosuchmodule'"),
    Row("nan-taylor", "a NaN weight (taylor scoring)", "prune {nan} --ratio 0.2 --out {out}", 2,
        "parameter model.layers.0.mlp.up_proj.weight holds 1 NaN value(s) (first at index [3, 5]); "
        "the checkpoint is corrupt or its training diverged"),
    Row("nan-l2", "a NaN weight (l2 scoring)", "prune {nan} --ratio 0.2 --importance l2 --out {out}", 2,
        "parameter model.layers.0.mlp.up_proj.weight holds 1 NaN value(s) (first at index [3, 5]); "
        "the checkpoint is corrupt or its training diverged"),
    Row("data-dependent", "a forward with data-dependent control flow",
        "analyze ddcf_model:make", 3,
        "torch.export could not trace Branchy at {world}/ddcf_model.py:13 in forward (`if h.sum() > 0:`): "
        "GuardOnDataDependentSymNode: *"),
    # -- arguments ---------------------------------------------------------------------------
    Row("ratio-range", "--ratio outside [0, 1)", "prune {model} --ratio 1.5", 2,
        "ratio must be a fraction in [0, 1) of the parameters to remove, got 1.5"),
    Row("importance", "an unknown --importance", "prune {model} --ratio 0.2 --importance magic", 2,
        "unknown importance criterion 'magic'; choose from [*'taylor'*]"),
    Row("round-to", "--round-to below 1", "prune {model} --ratio 0.2 --round-to 0", 2,
        "round_to must be a positive integer (or a dict of them per kind, or 'auto'), got 0"),
    Row("n-samples", "--n-samples below 1", "prune {model} --ratio 0.2 --n-samples 0", 2,
        "n_samples must be a positive integer, got 0"),
    Row("device", "an unknown --device", "prune {model} --ratio 0.2 --device gpu", 2,
        "--device 'gpu' is not a device (use auto, cpu, cuda or cuda:N)"),
    Row("seed", "a negative --seed", "prune {model} --ratio 0.2 --seed -1", 2, "--seed must be >= 0, got -1"),
    Row("lr", "recover --lr 0", "recover {model} --data {calib} --lr 0", 2, "--lr must be a positive number, got 0.0"),
    Row("steps", "recover --steps 0", "recover {model} --data {calib} --steps 0", 2,
        "--steps must be a positive integer, got 0"),
    Row("explain-target", "explain an unknown parameter", "explain {model} nope.weight", 2, "*nope.weight*"),
    # -- data files --------------------------------------------------------------------------
    Row("calib-missing", "a missing calibration file", "prune {model} --ratio 0.2 --calib {missing}.txt", 2,
        "calibration file {missing}.txt does not exist"),
    Row("calib-binary", "a binary calibration file", "prune {model} --ratio 0.2 --calib {binary}", 2,
        "calibration file {binary} looks binary (it contains NUL bytes), not UTF-8 text"),
    Row("calib-empty", "an empty calibration file", "prune {model} --ratio 0.2 --calib {empty}", 2,
        "calibration file {empty} is empty"),
    Row("calib-latin1", "a calibration file that is not UTF-8", "prune {model} --ratio 0.2 --calib {latin1}", 2,
        "calibration file {latin1} is not UTF-8 text (invalid byte at offset 5)"),
    Row("calib-jsonl", "a .jsonl file with a broken line", "prune {model} --ratio 0.2 --calib {brokenjsonl}", 2,
        "calibration file {brokenjsonl}: line 2 is not JSON (*)"),
    Row("calib-fields", "records without a text field", "prune {model} --ratio 0.2 --calib {numbers}", 2,
        "calibration file {numbers}: its records have no string field to read text from (fields: ['a', 'b']); "
        "expected one of *"),
    Row("calib-suffix", "an unsupported file type", "prune {model} --ratio 0.2 --calib {pdf}", 2,
        "unsupported calibration file type '.pdf' for {pdf}; use one of *"),
    Row("calib-no-tokenizer", "--calib for a model without tokenizer files",
        "prune {notok} --ratio 0.2 --calib {calib}", 2,
        "--calib needs a tokenizer: {notok} has none of tokenizer.json, tokenizer_config.json, tokenizer.model, "
        "vocab.txt..."),
    Row("eval-data", "eval --data that does not exist", "eval {model} --data {missing}.jsonl", 2,
        "data file {missing}.jsonl does not exist"),
    Row("recover-data", "recover --data that is binary", "recover {model} --data {binary}", 2,
        "data file {binary} looks binary (it contains NUL bytes), not UTF-8 text"),
    # -- outputs -----------------------------------------------------------------------------
    Row("out-is-input", "--out IN --overwrite", "prune {model} --ratio 0.2 --out {model} --overwrite", 2,
        "output directory {model} is the input {model}; choose another --out (fxprune never writes over or "
        "deletes its inputs)"),
    Row("out-holds-input", "--out PARENT_OF_IN --overwrite", "prune {model} --ratio 0.2 --out {world} --overwrite", 2,
        "output directory {world} contains the input {model}; choose another --out (fxprune never writes over "
        "or deletes its inputs)"),
    Row("out-in-input", "--out inside the input", "prune {model} --ratio 0.2 --out {model}/pruned", 2,
        "output directory {model}/pruned lies inside the input directory {model}; choose a path outside it "
        "(fxprune never writes into its inputs)"),
    Row("out-calib", "--out is the calibration file", "prune {model} --ratio 0.2 --calib {calib} --out {calib} "
        "--overwrite", 2, "output directory {calib} is the input {calib}; choose another --out (fxprune never "
        "writes over or deletes its inputs)"),
    Row("out-exists", "an existing --out without --overwrite", "prune {model} --ratio 0.2 --out {existing}", 2,
        "output directory {existing} exists; pass --overwrite (overwrite=True) to replace it"),
    Row("out-unwritable", "--out in a directory that cannot be written", "prune {model} --ratio 0.2 --out "
        "/proc/fxprune-out", 2, "output directory /proc/fxprune-out cannot be written: /proc is not writable (*); "
        "choose another --out"),
    Row("onnx-suffix", "export --onnx without .onnx", "export {model} --onnx {world}/model.bin", 2,
        "--onnx {world}/model.bin: give a path ending in .onnx"),
    Row("onnx-in-input", "export --onnx into the model directory", "export {model} --onnx {model}/model.onnx", 2,
        "ONNX file {model}/model.onnx lies inside the input directory {model}; choose a path outside it "
        "(fxprune never writes into its inputs)"),
    Row("bench-dense", "bench a plain checkpoint without --dense", "bench {model}", 2,
        "bench compares with the dense model: pass --dense DIR"),
)


# ------------------------------------------------------------------------------------------
# The world the rows run in
# ------------------------------------------------------------------------------------------
DDCF_SOURCE = '''"""A model whose forward branches on tensor values (for the error table)."""
import torch


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 8)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = h * 2
        return self.out(h)


def make():
    return Branchy(), {"x": torch.randn(2, 4)}
'''


def build_world(root: Path) -> dict[str, str]:
    """Write the models and files the rows use into ``root``; return the placeholder values."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers_text import tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    shutil.copytree(root / "model", root / "notok")
    for f in (root / "notok").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    (root / "noconf").mkdir()
    (root / "noconf" / "model.safetensors").write_bytes(b"")
    shutil.copytree(root / "model", root / "badconfig")
    (root / "badconfig" / "config.json").write_text('{"model_type": "llama",')
    shutil.copytree(root / "model", root / "noweights")
    (root / "noweights" / "model.safetensors").unlink()
    shutil.copytree(root / "model", root / "trunc")
    full = (root / "trunc" / "model.safetensors").stat().st_size
    os.truncate(root / "trunc" / "model.safetensors", full // 2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(root / "nan")
    tok.save_pretrained(root / "nan")
    (root / "existing").mkdir()
    (root / "calib.txt").write_text("the quick brown fox jumps over the lazy dog . " * 200)
    (root / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00data" * 50)
    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1").rjust(12, b" "))
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (root / "numbers.jsonl").write_text("\n".join(json.dumps({"a": i, "b": i * 2}) for i in range(3)))
    (root / "doc.pdf").write_bytes(b"%PDF-1.4")
    (root / "ddcf_model.py").write_text(DDCF_SOURCE)
    return {
        "world": str(root), "model": str(root / "model"), "notok": str(root / "notok"),
        "noconf": str(root / "noconf"), "badconfig": str(root / "badconfig"),
        "noweights": str(root / "noweights"), "trunc": str(root / "trunc"), "nan": str(root / "nan"),
        "existing": str(root / "existing"), "calib": str(root / "calib.txt"), "binary": str(root / "binary.txt"),
        "empty": str(root / "empty.txt"), "latin1": str(root / "latin1.txt"),
        "brokenjsonl": str(root / "broken.jsonl"), "numbers": str(root / "numbers.jsonl"),
        "pdf": str(root / "doc.pdf"), "missing": str(root / "missing"), "out": str(root / "out"),
    }


def expand(template: str, paths: dict[str, str]) -> str:
    return template.format(**paths)


def matches(message: str, template: str, paths: dict[str, str]) -> bool:
    """Whether a printed message fits a row's template (``*`` = anything)."""
    pattern = "".join(".*" if part == "*" else re.escape(part)
                      for part in re.split(r"(\*)", expand(template, paths)))
    return re.fullmatch(pattern, message, flags=re.S) is not None


# ------------------------------------------------------------------------------------------
# The README section
# ------------------------------------------------------------------------------------------
def _display(text: str) -> str:
    """Placeholders as the reader would write them: {model} -> MODEL, {world} -> DIR, {x} -> DIR/x."""
    names = {"world": "DIR", "model": "MODEL"}
    return re.sub(r"\{(\w+)\}", lambda m: names.get(m.group(1), f"DIR/{m.group(1)}"), text)


def readme_section() -> str:
    from fxprune.util.text import DATA_FILE_HELP

    lines = [
        START,
        "## Data files and errors",
        "",
        "One meaning for data files everywhere (`prune --calib`, `eval --data`, `recover --data`, and",
        "`calib=` / `data=` in Python): " + DATA_FILE_HELP + ".",
        "",
        "Every argument, path, permission and data file is checked before a model is loaded. Errors are",
        "one line that names the file, the parameter or the source line; bad inputs exit with 2, a model",
        "that cannot be traced with 3, an interrupted run (SIGINT/SIGTERM) with 130, leaving no output",
        "and no temporary files. `--overwrite` never replaces an input, nor a directory that holds one",
        "or lies inside one; two runs into one `--out` do not race (the second fails at once). The",
        "table is generated from `tests/error_table.py`, and `tests/test_errors.py` runs every row.",
        "",
        "| bad input | command | exit | `fxprune: error: ...` |",
        "|---|---|---|---|",
    ]
    for r in ROWS:
        msg = _display(r.message).replace("*", "…").replace("|", "\\|")
        cmd = _display(r.command).replace("|", "\\|")
        lines.append(f"| {r.bad_input} | `fxprune {cmd}` | {r.code} | {msg} |")
    lines.append(END)
    return "\n".join(lines)


def update_readme(path: Path = README) -> bool:
    """Rewrite the section between the markers (insert it before 'Supported architectures')."""
    text = path.read_text()
    section = readme_section()
    if START in text:
        new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        anchor = "## Supported architectures"
        new = text.replace(anchor, section + "\n\n" + anchor, 1)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    print("README updated" if update_readme() else "README already up to date")
    sys.exit(0)


__all__ = ["ROWS", "Row", "build_world", "expand", "matches", "readme_section", "update_readme"]
