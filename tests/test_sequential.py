"""Sequential mode gives the in-memory result while holding one block at a time.

Each model is saved as a real safetensors checkpoint and streamed back block by block; the
reference is the ordinary in-memory pass on the same model.  Block-local criteria and input
statistics must be bitwise equal; gradient criteria go through the streamed backward and must
agree to float rounding.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import AnalysisError, BadInputError, ModelLoadError
from fxprune.io import Checkpoint
from fxprune.passes import sequential as seq
from fxprune.passes.stats import StatSpec, gather_stats
from tests import zoo


def _batches(n: int = 3, seed: int = 1, name: str = "llama_gqa") -> list[dict]:
    if zoo.ZOO[name].family == "cnn":
        torch.manual_seed(seed)
        return [zoo.ZOO[name].make_inputs(2, 8) for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, zoo.VOCAB, (2, 8), generator=g),
             "attention_mask": torch.ones(2, 8, dtype=torch.long)} for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _setup(name: str, root: str):
    """(model, its analysis, checkpoint dir, skeleton, skeleton analysis) for a zoo model."""
    model = zoo.ZOO[name].build().eval()
    path = os.path.join(root, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
        batch = _batches(1, name=name)[0]
        analysis = fxprune.analyze(fxprune.trace(model, kwargs=batch))
        skeleton = seq.skeleton_from_checkpoint(path)
        sk_analysis = fxprune.analyze(fxprune.trace(seq.meta_twin(skeleton), kwargs=batch))
    return model, analysis, path, skeleton, sk_analysis


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("seq"))


def _score_both(name, root, importance, **kwargs):
    model, analysis, path, skeleton, sk_analysis = _setup(name, root)
    batches = _batches(name=name)
    ref = fxprune.score(model, analysis, batches, importance=importance, progress=False)
    run = seq.score_sequential(skeleton, Checkpoint.open(path), sk_analysis, batches, importance=importance,
                               device="cpu", progress=False, **kwargs)
    return ref, run


@pytest.mark.parametrize("importance", ["activation", "flap", "l2"])
def test_block_local_scores_equal_in_memory_exactly(root, importance):
    ref, run = _score_both("llama_gqa", root, importance)
    assert run.mode == "forward"
    assert set(ref) == set(run.scores)
    for gid in ref:
        if gid in ref.fallback:  # flap cannot score q/k head dims: in memory they are ranked by weight
            assert gid in run.scores.unscored  # norm, on meta (no weights left to rank by) kept whole
            continue
        np.testing.assert_array_equal(ref[gid], run.scores[gid], err_msg=gid)
    if importance == "flap":  # the means bias compensation adds back
        assert set(ref.input_mean) == set(run.scores.input_mean)
        for k in ref.input_mean:
            np.testing.assert_array_equal(ref.input_mean[k], run.scores.input_mean[k])
    assert (run.scores.n_batches, run.scores.n_tokens) == (ref.n_batches, ref.n_tokens)
    # every block was onloaded, used and offloaded: the skeleton holds no weight afterwards
    _, _, _, skeleton, _ = _setup("llama_gqa", root)
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_a_cnn_is_cut_at_its_stages_and_scored_exactly(root):
    """ConvNeXt: stages are the blocks; the stem outside them sees the most rows, which the
    activation criterion's weight-only members (norms, layer scales) depend on."""
    ref, run = _score_both("hf_convnext", root, "activation")
    assert run.cut.blocks[0].endswith("stages.0")
    for gid in ref:
        np.testing.assert_array_equal(ref[gid], run.scores[gid], err_msg=gid)


def test_activations_spilled_to_disk_give_the_same_scores(root, tmp_path):
    ref, run = _score_both("llama_gqa", root, "activation", ram_bytes=0, offload_dir=str(tmp_path))
    assert run.activation_bytes["activations_disk_peak_bytes"] > 0
    assert run.activation_bytes["activations_ram_peak_bytes"] == 0
    for gid in ref:
        np.testing.assert_array_equal(ref[gid], run.scores[gid])
    assert os.listdir(tmp_path) == []  # the spill files are gone


def test_taylor_streams_the_backward_block_by_block(root):
    ref, run = _score_both("llama_gqa", root, "taylor")
    assert run.mode == "recompute"
    for gid in ref:
        np.testing.assert_allclose(run.scores[gid], ref[gid], rtol=1e-6, atol=1e-12, err_msg=gid)


def test_tied_embeddings_taylor_is_close_and_the_plan_is_the_same(root):
    # GPT-2 ties wte to lm_head: its gradient arrives in two passes (head, then embedding)
    ref, run = _score_both("gpt2", root, "taylor")
    for gid in ref:
        np.testing.assert_allclose(run.scores[gid], ref[gid], rtol=1e-5, atol=1e-12, err_msg=gid)
    model, analysis, *_ = _setup("gpt2", root)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    a = fxprune.make_plan(analysis, ref, 0.3, numel=numel)
    b = fxprune.make_plan(analysis, run.scores, 0.3, numel=numel)
    assert a.as_dict() == b.as_dict()


def test_statistics_match_gather_stats(root):
    """Moments and H/A are exact (block-local); G comes through the streamed backward."""
    model, _, path, skeleton, sk_analysis = _setup("llama_gqa", root)
    batches = _batches()
    spec = StatSpec(input_moments=True, input_cov=True, grad_cov=True, bias_column=True)
    ref = gather_stats(model, batches, spec, progress=False)
    seen = []
    got = seq.gather_stats_sequential(skeleton, Checkpoint.open(path), sk_analysis, batches, spec, device="cpu",
                                      progress=False, on_block=lambda b, m, s: seen.append((b, sorted(s))))
    assert set(got) == set(ref) and (got.n_batches, got.n_tokens) == (ref.n_batches, ref.n_tokens)
    for name, a in ref.items():
        b = got[name]
        assert (b.slot, b.count, b.cov_count, b.grad_count) == (a.slot, a.count, a.cov_count, a.grad_count), name
        for key in ("x_sum", "x_sq", "xxT"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)
        torch.testing.assert_close(b.ggT, a.ggT, rtol=1e-5, atol=1e-9)
    # on_block saw each block while it was loaded, with that block's layers only
    blocks = [b for b, _ in seen if b.startswith("model.layers.")]
    assert sorted(blocks) == ["model.layers.0", "model.layers.1"]
    assert all(all(n.startswith(b + ".") for n in names) for b, names in seen if b.startswith("model.layers."))


def test_prune_and_save_shard_by_shard_equal_in_memory_prune(root, tmp_path):
    model, _, path, _, _ = _setup("gpt2", root)  # tied weights, and attribute conflicts (split_size)
    batches = _batches()
    ref = fxprune.prune(model, 0.3, calib=batches, importance="activation", example_inputs=batches[0],
                        progress=False)
    res = seq.prune_sequential(path, 0.3, calib=batches, importance="activation", example_inputs=batches[0],
                               device="cpu", progress=False)
    assert res.plan.as_dict() == ref.plan.as_dict()
    out = tmp_path / "out"
    seq.save_sequential(res, str(out), max_shard_bytes=40_000, progress=False)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = fxprune.load(str(out))
    want = ref.model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, ref.model(**batches[0]).logits, rtol=0, atol=0)
    # the output also loads on meta (headers only) with the pruned shapes
    meta = fxprune.load(str(out), device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert {n: tuple(p.shape) for n, p in meta.named_parameters()} == {n: tuple(p.shape) for n, p in loaded.named_parameters()}
    with pytest.raises(fxprune.UnsafeOutputError):  # never written into the source checkpoint
        seq.save_sequential(res, os.path.join(path, "inside"), progress=False)


def test_the_cut_follows_the_residual_stream(root):
    *_, sk_analysis = _setup("llama_gqa", root)
    cut = seq.cut_blocks(sk_analysis.graph)
    assert cut.blocks == ("model.layers.0", "model.layers.1")
    assert "model.embed_tokens.weight" in cut.tensors[seq.RESIDENT]
    assert {"lm_head.weight", "model.norm.weight"} <= set(cut.tensors[seq.POST])
    assert all(t.startswith("model.layers.1.") for t in cut.tensors["model.layers.1"])
    assert len(cut.stream["model.layers.1"]) == 1  # one tensor crosses: the residual stream
    assert cut.chain_only == {"model.layers.0"}


class _Shared(nn.Module):
    """Layer 0 runs twice: weights shared across depth cannot be replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](self.layers[1](self.layers[0](x)))


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("cls, error", [(_Shared, AnalysisError), (_Flat, BadInputError)])
def test_models_that_cannot_be_cut_are_refused(cls, error):
    skeleton = seq.skeleton_from_checkpoint("unused", factory=cls)
    graph = fxprune.trace(skeleton, (torch.randn(2, 6),))
    with pytest.raises(error):
        seq.cut_blocks(graph)


def test_missing_weights_name_the_tensor(root, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, path, skeleton, sk_analysis = _setup("llama_gqa", root)
    state = load_file(os.path.join(path, "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight"):
        seq.score_sequential(skeleton, Checkpoint.open(str(tmp_path)), sk_analysis, _batches(1),
                             importance="activation", device="cpu", progress=False)


def test_needs_sequential_compares_the_checkpoint_with_free_memory(root):
    _, _, path, _, _ = _setup("llama_gqa", root)
    size = Checkpoint.open(path).nbytes()
    assert seq.needs_sequential(path, "cpu", available=size)[0]  # 3x the weights do not fit in 1x
    fits, why = seq.needs_sequential(path, "cpu", available=100 * size)
    assert not fits and "GB" in why


def test_cli_prune_sequential_writes_a_loadable_model(root, tmp_path, capsys):
    from fxprune import cli

    _, _, path, _, _ = _setup("llama_gqa", root)
    out = tmp_path / "pruned"
    assert cli.main(["prune", path, "--ratio", "0.2", "--importance", "l2", "--sequential", "--out", str(out),
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "sequential (forward): 2 blocks" in printed
    record = json.loads((out / "fxprune.json").read_text())
    assert record["sequential"]["blocks"] == 2 and record["plan"]
    loaded = fxprune.load(str(out))
    n = sum(p.numel() for p in loaded.parameters())
    dense = sum(p.numel() for p in _setup("llama_gqa", root)[0].parameters())
    assert 0.75 * dense < n < 0.85 * dense


def test_only_the_current_block_and_the_resident_weights_are_alive(root):
    """Peak memory is one block: nothing keeps an earlier block's weights once it is offloaded."""
    import gc

    _, _, path, skeleton, sk_analysis = _setup("llama_gqa", root)

    def real_matrices() -> list[nn.Parameter]:
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, nn.Parameter) and o.dim() == 2 and o.device.type != "meta"]

    before = real_matrices()  # held, so no new parameter can reuse their ids
    known = {id(p) for p in before}
    alive = []

    def count(block, module, stats):
        alive.append((block, sum(1 for p in real_matrices() if id(p) not in known)))

    seq.score_sequential(skeleton, Checkpoint.open(path), sk_analysis, _batches(), importance="activation",
                         spec=StatSpec(input_moments=True), keep_stats=False, on_block=count, device="cpu",
                         progress=False)
    per_block = sum(1 for n, p in skeleton.named_parameters() if n.startswith("model.layers.0.") and p.dim() == 2)
    assert [b for b, _ in alive][:2] == ["model.layers.0", "model.layers.1"]
    assert all(n == per_block + 1 for b, n in alive if b.startswith("model.layers.")), alive  # + the embedding
    assert not [p for p in real_matrices() if id(p) not in known]  # everything offloaded at the end


@pytest.mark.parametrize("name, importance", [("llama_gqa", "obs"), ("bert", "obs"), ("llama_gqa", "surgeon"),
                                              ("qwen3", "surgeon")])
def test_curvature_costs_equal_in_memory(root, name, importance):
    """obs reads H = E[x xᵀ] of each block's exact inputs: its costs are the in-memory ones bit for
    bit.  surgeon's A is exact too; its G comes through the streamed backward (float rounding)."""
    ref, run = _score_both(name, root, importance)
    assert run.mode == ("forward" if importance == "obs" else "recompute")
    assert set(ref) == set(run.scores) and dict(run.scores.member_methods) == dict(ref.member_methods)
    for gid in ref:
        if importance == "obs":
            np.testing.assert_array_equal(run.scores.raw[gid], ref.raw[gid], err_msg=gid)
        else:
            np.testing.assert_allclose(run.scores.raw[gid], ref.raw[gid], rtol=1e-4, atol=1e-12, err_msg=gid)
    assert (run.scores.n_batches, run.scores.n_tokens) == (ref.n_batches, ref.n_tokens)
    _, _, _, skeleton, _ = _setup(name, root)
    assert all(p.device.type == "meta" for p in skeleton.parameters())


@pytest.mark.parametrize("name, importance", [("llama_gqa", "obs"), ("qwen3", "surgeon")])
def test_curvature_prune_with_its_update_equals_in_memory(root, tmp_path, name, importance):
    """The whole sequential pipeline with the criterion's weight update, block by block: the same
    plan, the same compensated weights and the same outputs as the in-memory one-shot prune."""
    model, _, path, _, _ = _setup(name, root)
    batches = _batches(name=name)
    ref = fxprune.prune(model, 0.3, calib=batches, importance=importance, shots=1, example_inputs=batches[0],
                        progress=False)
    res = seq.prune_sequential(path, 0.3, calib=batches, importance=importance, example_inputs=batches[0],
                               device="cpu", progress=False)
    assert res.plan.as_dict() == ref.plan.as_dict()
    assert res.report.allocation == ref.report.allocation == "cost"
    assert res.update is not None and res.update.method == importance == ref.report.update
    assert set(res.update.changed) <= set(ref.weights.changed) and len(res.update.changed) > 0
    _saved_equals_in_memory(res, ref, tmp_path, batches[0], exact=importance == "obs")


def _saved_equals_in_memory(res, ref, tmp_path, inputs, *, exact: bool) -> None:
    """The sequential prune, saved shard by shard and loaded, has the in-memory prune's weights
    and outputs (bitwise when ``exact``)."""
    out = tmp_path / "out"
    seq.save_sequential(res, str(out), progress=False)
    loaded = fxprune.load(str(out))
    want, got = ref.model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    with torch.no_grad():
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(loaded(**inputs).logits, ref.model(**inputs).logits, **tol)


def test_a_sequential_update_past_its_ram_spills_to_disk_and_cleans_up(root, tmp_path):
    _, _, path, _, _ = _setup("llama_gqa", root)
    batches = _batches()
    res = seq.prune_sequential(path, 0.3, calib=batches, importance="obs", example_inputs=batches[0], device="cpu",
                               progress=False)
    spill = tmp_path / "spill"
    spill.mkdir()
    upd = seq.update_sequential(res.model, res.analysis, res.plan, res.scores, ram_bytes=0, offload_dir=str(spill))
    assert os.listdir(spill) and set(upd.changed) == set(res.update.changed)
    for k in upd.changed:
        assert torch.equal(upd.changed[k], res.update.changed[k]), k
    upd.changed.close()
    assert os.listdir(spill) == []


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2"])
def test_flap_with_its_bias_compensation_equals_in_memory(root, tmp_path, name):
    """FLAP's update in sequential mode: b += W[:, P]·x̄[P] block by block from the scoring pass'
    exact input means; biases added to bias-free layers (Llama's down_proj) are written too."""
    model, _, path, _, _ = _setup(name, root)
    batches = _batches(name=name)
    ref = fxprune.prune(model, 0.3, calib=batches, importance="flap", example_inputs=batches[0], progress=False)
    res = seq.prune_sequential(path, 0.3, calib=batches, importance="flap", example_inputs=batches[0],
                               device="cpu", progress=False)
    assert res.plan.as_dict() == ref.plan.as_dict()
    assert res.update is not None and res.update.method == "flap" == ref.report.update
    assert set(res.update.added) == set(ref.weights.added) and set(res.update.changed) == set(ref.weights.changed)
    assert res.update.added or res.update.changed
    _saved_equals_in_memory(res, ref, tmp_path, batches[0], exact=True)
