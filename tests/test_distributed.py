"""Data parallelism over torch.distributed gives the single-process result.

Real processes (``torch.multiprocessing.spawn`` and ``torchrun``), real gloo: each rank scores its
shard of the calibration batches, the sums are all-reduced, rank 0 plans and broadcasts.  The
reference is one process over all batches; sums add up in another order, so equality is to
float tolerance.  One spawned job runs every two-rank check (process start-up and the first
trace dominate the cost); a three-rank job goes through ``torchrun -m fxprune prune``.

Statistics for OBS (``H = Σ x xᵀ``) and the surgeon criteria (K-FAC ``A`` with the bias column,
``G = Σ g gᵀ``) are checked as the ``Stats`` those criteria consume, and the criteria with their
weight updates end to end, in memory and in sequential mode.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import fxprune
from fxprune.passes.stats import StatSpec, gather_stats
from tests import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = StatSpec(input_moments=True, input_cov=True, grad_cov=True, bias_column=True)
MODEL = "llama_gqa"
IMPORTANCES = ("taylor", "activation", "obs", "surgeon")  # surgeon and obs: their statistics and their weight updates


def _batches(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, zoo.VOCAB, (2, 8), generator=g),
             "attention_mask": torch.ones(2, 8, dtype=torch.long)} for _ in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _analysis():
    """The model's analysis, traced once per process (every check below reuses it)."""
    global _ANALYSIS
    if _ANALYSIS is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ANALYSIS = fxprune.analyze(fxprune.trace(zoo.ZOO[MODEL].build().eval(), kwargs=_batches(1)[0]))
    return _ANALYSIS


_ANALYSIS = None


def _prune(importance: str, dist=None):
    warnings.simplefilter("ignore")
    res = fxprune.prune(_analysis(), 0.3, calib=_batches(), importance=importance, progress=False, distributed=dist)
    return {"scores": {k: np.asarray(v) for k, v in res.scores.items()}, "plan": res.plan.as_dict(),
            "state": {k: v.clone() for k, v in res.model.state_dict().items()}, "n_batches": res.scores.n_batches,
            "n_tokens": res.scores.n_tokens}


def _stats(st) -> dict:
    return {n: {**{k: t.clone() for k, t in ls.tensors().items()},
                "counts": (ls.count, ls.cov_count, ls.grad_count)} for n, ls in st.items()}


def _worker(rank: int, world: int, port: int, out: str, checkpoint: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from fxprune.distributed import init_distributed
    from fxprune.io import Checkpoint
    from fxprune.passes import sequential as seq

    dist = init_distributed()
    assert dist is not None and dist.backend == "gloo" and dist.world_size == world
    results: dict = {"rank": rank}
    for importance in IMPORTANCES:
        results[importance] = _prune(importance, dist)
    model = _analysis().graph.module
    results["stats"] = _stats(dist.reduce_stats(gather_stats(model, dist.shard(_batches()), SPEC, progress=False)))
    # sequential mode: every block's sums are all-reduced before the block is scored (the skeleton
    # is the same architecture, so the model's analysis serves it)
    skeleton = seq.skeleton_from_checkpoint(checkpoint)
    run = seq.score_sequential(skeleton, Checkpoint.open(checkpoint), _analysis(), dist.shard(_batches()),
                               importance="taylor", spec=SPEC, device="cpu", distributed=dist, progress=False)
    results["seq_scores"] = {k: np.asarray(v) for k, v in run.scores.items()}
    results["seq_stats"] = _stats(run.stats)
    # sequential obs with its update: per-block H all-reduced for the costs and again for the update
    res = seq.prune_sequential(checkpoint, 0.3, calib=_batches(), importance="obs", example_inputs=_batches(1)[0],
                               device="cpu", distributed=dist, progress=False)
    results["seq_obs"] = {"plan": res.plan.as_dict(), "update": {k: v.clone() for k, v in res.update.changed.items()},
                          "scores": {k: np.asarray(v) for k, v in res.scores.raw.items()}}
    results["checkpoint"] = checkpoint
    # FSDP2: module-hook statistics work on sharded parameters; gradient criteria are refused
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = zoo.ZOO[MODEL].build().eval()
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    results["fsdp_stats"] = _stats(dist.reduce_stats(gather_stats(sharded, dist.shard(_batches()), SPEC,
                                                                  progress=False)))
    analysis = _analysis()
    act = fxprune.score(sharded, analysis, dist.shard(_batches()), importance="activation",
                        sync=dist.reduce_scoring, progress=False)
    results["fsdp_activation"] = {k: np.asarray(v) for k, v in act.items()}
    try:
        fxprune.score(sharded, analysis, dist.shard(_batches()), importance="taylor", sync=dist.reduce_scoring,
                      progress=False)
        results["fsdp_taylor"] = "ran"
    except fxprune.ScoringError as exc:
        results["fsdp_taylor"] = str(exc)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("dist")
    checkpoint = str(root / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zoo.ZOO[MODEL].build().save_pretrained(checkpoint)
    mp.spawn(_worker, args=(2, _free_port(), str(root), checkpoint), nprocs=2, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close_scores(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=1e-5, atol=1e-10, err_msg=gid)


def _close_stats(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, fields in want.items():
        assert got[name]["counts"] == fields["counts"], name
        for key, t in fields.items():
            if key != "counts":
                torch.testing.assert_close(got[name][key], t, rtol=1e-5, atol=1e-5 * float(t.abs().max()),
                                           msg=lambda m, n=name, k=key: f"{n}.{k}: {m}")


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_two_ranks_give_the_single_process_scores_plan_and_weights(two_ranks, importance):
    want = _prune(importance)
    for rank in two_ranks:
        got = rank[importance]
        _close_scores(got["scores"], want["scores"])
        assert got["plan"] == want["plan"]  # rank 0's plan, broadcast
        assert (got["n_batches"], got["n_tokens"]) == (want["n_batches"], want["n_tokens"])
        assert set(got["state"]) == set(want["state"])
        for k, t in want["state"].items():
            if importance in ("taylor", "activation"):
                torch.testing.assert_close(got["state"][k], t, rtol=0, atol=0)  # same plan: the same slices
            else:  # surgeon and obs update the kept weights from the all-reduced curvature
                torch.testing.assert_close(got["state"][k], t, rtol=1e-4, atol=1e-5 * max(float(t.abs().max()), 1.0))


def test_two_ranks_give_the_single_process_obs_and_kfac_statistics(two_ranks):
    model = _analysis().graph.module
    want = _stats(gather_stats(model, _batches(), SPEC, progress=False))
    for rank in two_ranks:
        _close_stats(rank["stats"], want)
        _close_stats(rank["seq_stats"], want)  # sequential + distributed


def test_two_ranks_in_sequential_mode_give_the_single_process_obs_plan_and_update(two_ranks):
    from fxprune.passes import sequential as seq

    warnings.simplefilter("ignore")
    one = seq.prune_sequential(two_ranks[0]["checkpoint"], 0.3, calib=_batches(), importance="obs",
                               example_inputs=_batches(1)[0], device="cpu", progress=False)
    for rank in two_ranks:
        got = rank["seq_obs"]
        _close_scores(got["scores"], {k: np.asarray(v) for k, v in one.scores.raw.items()})
        assert got["plan"] == one.plan.as_dict()
        assert set(got["update"]) == set(one.update.changed)
        for k, t in one.update.changed.items():
            torch.testing.assert_close(got["update"][k], t, rtol=1e-4, atol=1e-6, msg=k)


def test_two_ranks_in_sequential_mode_give_the_single_process_taylor_scores(two_ranks):
    analysis = _analysis()
    want = fxprune.score(analysis.graph.module, analysis, _batches(), importance="taylor", progress=False)
    for rank in two_ranks:
        _close_scores(rank["seq_scores"], {k: np.asarray(v) for k, v in want.items()})


def test_fsdp2_sharded_model_gives_module_hook_statistics_and_refuses_taylor(two_ranks):
    analysis = _analysis()
    model = analysis.graph.module
    want = _stats(gather_stats(model, _batches(), SPEC, progress=False))
    act = fxprune.score(model, analysis, _batches(), importance="activation", progress=False)
    for rank in two_ranks:
        _close_stats(rank["fsdp_stats"], want)
        _close_scores(rank["fsdp_activation"], {k: np.asarray(v) for k, v in act.items()})
        assert "FSDP2-sharded" in rank["fsdp_taylor"] and "already averaged" in rank["fsdp_taylor"]


@pytest.mark.slow
def test_three_ranks_under_torchrun_prune_like_one_process(tmp_path):
    """``torchrun --nproc-per-node 3 -m fxprune prune DIR``: the single-process result (the two-rank job
    covers sequential mode under torch.distributed)."""
    from tests.helpers_tok import DEFAULT_LINES, make_tokenizer

    tok = make_tokenizer()
    model_dir = tmp_path / "llama"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zoo.ZOO[MODEL].build().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(DEFAULT_LINES * 30))
    common = ["prune", str(model_dir), "--ratio", "0.2", "--calib", str(calib), "--n-samples", "6", "--seq-len", "8",
              "--importance", "taylor", "--quiet", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
                           "--master-port", str(_free_port()), "-m", "fxprune", *common, "--out",
                           str(tmp_path / "three"), "--no-sequential"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("written to") == 1  # rank 0 writes and reports
    # the same prune in this process, on all six windows
    one = fxprune.prune(_analysis(), 0.2, calib=str(calib), tokenizer=tok, n_samples=6, seq_len=8,
                        importance="taylor", device="cpu", progress=False)
    three = fxprune.load(str(tmp_path / "three"))
    assert json.loads((tmp_path / "three" / "fxprune.json").read_text())["plan"] == one.plan.as_dict() != {}
    a, b = one.model.state_dict(), three.state_dict()
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_a_model_placed_by_accelerate_device_map_auto_scores_like_the_plain_one(tmp_path):
    """``from_pretrained(device_map="auto")`` (accelerate places it; here all on the CPU) scores as loaded plainly."""
    import transformers

    analysis = _analysis()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis.graph.module.save_pretrained(tmp_path)
        placed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    want = fxprune.score(analysis.graph.module, analysis, _batches(2), importance="taylor", progress=False)
    got = fxprune.score(placed, analysis, _batches(2), importance="taylor", progress=False)
    _close_scores({k: np.asarray(v) for k, v in got.items()}, {k: np.asarray(v) for k, v in want.items()})
