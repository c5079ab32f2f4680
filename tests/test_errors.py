"""Every bad input gets a clear one-line error naming the thing, with the right exit code.

The rows live in ``tests/error_table.py``; the README's error table is generated from them, so
what the README promises is exactly what these tests check.
"""

from __future__ import annotations

import shlex

import pytest

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
