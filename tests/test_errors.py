"""Every bad input gets a clear one-line error naming the thing, with the right exit code.

The rows live in ``tests/error_table.py``; the README's error table is generated from them, so
what the README promises is exactly what these tests check.
"""

from __future__ import annotations

import shlex

import pytest
import torch

from fxprune import cli
from tests import error_table
from tests.error_table import ROWS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return error_table.build_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_error_table_row(row, world, capsys, monkeypatch):
    monkeypatch.chdir(world["world"])  # module:factory models are imported from the working directory
    code = cli.main(shlex.split(error_table.expand(row.command, world)))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fxprune: error: ")]
    assert lines, err[-2000:]
    message = lines[0][len("fxprune: error: "):]
    assert code == row.code, err[-2000:]
    assert error_table.matches(message, row.message, world), f"\n got: {message}\nwant: {row.message}"
    if row.code == 2:  # bad input: one line, nothing else
        assert len(lines) == 1 and not err.split("fxprune: error: ", 1)[1].count("\n") > 1


def test_readme_error_table_is_generated_from_the_rows():
    text = error_table.README.read_text()
    assert error_table.readme_section() in text, "run: python -m tests.error_table"


def test_help_documents_the_data_file_meaning(capsys):
    for cmd in (["prune", "--help"], ["eval", "--help"], ["recover", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(cmd)
        out = " ".join(capsys.readouterr().out.split())
        assert ".txt/.text/.md = one document" in out and "records with a text field" in out


# ------------------------------------------------------------------------------------------
# torch.export's calling conventions for example inputs
# ------------------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x, scale=None):
        y = self.b(torch.relu(self.a(x)))
        return y if scale is None else y * scale


CONVENTIONS = {
    "tuple": lambda x: (x,),
    "dict": lambda x: {"x": x},
    "args-kwargs": lambda x: ((x,), {"scale": torch.tensor(2.0)}),
}


@pytest.mark.parametrize("how", list(CONVENTIONS))
def test_prune_and_trace_take_torch_export_conventions(how):
    import fxprune

    torch.manual_seed(0)
    model, x = _Tiny().eval(), torch.randn(3, 4)
    ex = CONVENTIONS[how](x)
    graph = fxprune.trace(model, example_inputs=ex)
    assert graph.exported_program is not None
    res = fxprune.prune(model, 0.3, example_inputs=ex, importance="taylor", round_to=1, progress=False)
    assert res.report.verification.startswith("verified outputs equal the zeroed original")
    args, kwargs = fxprune.passes.capture.split_example_inputs(ex)
    assert res.model(*args, **kwargs).shape == (3, 2)


def test_a_bad_example_inputs_form_names_the_conventions():
    import fxprune

    with pytest.raises(fxprune.BadInputError, match="tuple of positional args, a dict of keyword args"):
        fxprune.prune(_Tiny(), 0.2, example_inputs="x", progress=False)


@pytest.mark.slow
def test_export_and_benchmark_build_default_inputs_for_hf_models(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxprune

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    default = fxprune.export_onnx(model, tmp_path / "default.onnx", optimize=False)
    assert "input_ids" in default.input_names and default.max_abs_diff < 1e-4
    positional = fxprune.export_onnx(model, tmp_path / "positional.onnx", example_inputs=(ids,), optimize=False)
    assert positional.input_names == ["input_ids"]
    lat = fxprune.benchmark_latency(model, prompt_len=8, decode_tokens=2, warmup=0, repeats=1)
    assert lat.prefill_ms > 0 and lat.decode_ms_per_token > 0
    rec = fxprune.recover(model, [{"input_ids": torch.randint(0, 50, (2, 12))}] * 2, example_inputs=(ids,),
                          max_steps=1, progress=False)
    assert "lm_head" not in rec.target_modules
