"""A seeded slice of the fuzzing campaign (bench/fuzz.py): random architectures, pruned at random.

Every model is traced, analysed and pruned at random, and whatever ``rewrite`` returned must equal
the original with the removed units zeroed at two batch sizes (and two sequence lengths), judged
in float64 where float32 is ambiguous.  No model may come back silently wrong, and nothing may
crash with an exception that is not an fxprune error.  The full campaign (5,000 models) is
``python bench/fuzz.py``; its counts are in bench/results/fuzz.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAILURES = ("silently-wrong", "broken-at-other-shape", "verify-refused", "crash:", "timeout")


@pytest.mark.slow
def test_seeded_fuzz_slice_has_no_silent_errors_and_no_crashes(tmp_path):
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuzz.py"), "--n", "200", "--seed", "7", "--max-blocks", "3",
         "--workers", "2", "--chunk", "200", "--no-minimise", "--quiet", "--chunks-dir", "", "--out", str(out)],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=1800)
    summary = json.loads(out.read_text())
    bad = {k: v for k, v in summary["counts"].items() if k.startswith(FAILURES)}
    assert not bad, (bad, [(f["index"], f["outcome"], f.get("error"), f["spec"]) for f in summary["failures"]][:5])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["n"] == 200
    judged = sum(v for k, v in summary["counts"].items() if k.startswith("ok"))
    assert judged >= 140, summary["counts"]  # most models really were pruned and compared
    assert set(summary["families"]) == {"seq", "image"}
    assert len(summary["block_kinds"]) >= 14, summary["block_kinds"]
