"""Sequential mode: prune a model whose weights do not fit, one block at a time.

    checkpoint dir --skeleton_from_checkpoint--> model on meta (real buffers)
        --trace/analyze--> Analysis --cut_blocks--> BlockCut
        --score_sequential--> SequentialScores (Scores + Stats, exactly as in memory)
        --make_plan--> Plan --(meta) rewrite--> shapes --save_sequential--> sharded checkpoint

Everything that needs the weights runs block by block: a block's tensors are read from the
safetensors checkpoint (memory-mapped, only that block copied out), every calibration batch goes
through it, its statistics are summed and its members scored, and it goes back to ``meta``.
Block outputs are kept on the CPU (spilled to memory-mapped files on disk past a RAM budget).
The rewrite and the save go the same way: each block is read, sliced to the plan and written at
its place in the output shards.  Peak memory is about one block plus the activations plus the
weights outside the blocks (embeddings, final norm, head).

**Where the cut is, and why on the module tree.**  :func:`cut_blocks` reads the exported graph:
every node's ``nn_module_stack`` says which repeated block (``model.layers.<i>``) it belongs to,
so the graph gives the blocks in execution order, checks that no two interleave, finds which
tensors each block owns (its parameters used nowhere else), which outside tensors are needed
before/between the blocks (embeddings, RoPE buffers: *resident*) or only after the last one
(final norm, head: *post*), and the values crossing each boundary -- the residual stream from
the previous block and the shared values (masks, position embeddings) computed before block 0.
The cut is *executed* on the module tree, not as fx subgraphs: the model's own forward runs with
each block's ``forward`` replaced -- earlier blocks *replay* their saved outputs, the current
block runs for real (then the forward stops), later blocks are never reached.  That keeps
:class:`~fxprune.passes.stats.Collector`'s module hooks working unchanged (so ``Stats`` and
``Scores`` are the in-memory ones by construction, not a re-implementation), and the model's own
code computes every per-layer input (causal/sliding-window masks per layer type, RoPE), which a
graph cut would have to reproduce.  A block called twice in one forward (weights shared across
depth) or out of order is detected at run time and refused.

**Which criteria are exact.**  Block-local criteria -- ``activation``, ``flap``, ``l1``/``l2``,
``random``, and any statistic from layer inputs (moments, OBS ``H``, K-FAC ``A``) -- see exactly the
in-memory inputs, so their scores and statistics are equal to the in-memory ones.  Gradient
criteria (``taylor*``, K-FAC ``G``) use the **exact streamed backward** (recompute): a forward
sweep saves every block's output for every batch; the full forward with all blocks replayed
gives the loss, whose backward yields the gradient at the last block's output; then, from the
last block to the first, each block is recomputed from its saved input and back-propagated with
the saved output gradient, which yields its parameters' gradients (per batch, complete) and the
gradient at its input for the block before.  That is reverse-mode checkpointing at block
boundaries, so the gradients are the in-memory ones up to floating-point summation order; the
cost is a second pass over the weights and every block's outputs kept (on disk if need be).
One approximation remains, only for criteria non-linear in one batch's gradient
(``taylor-element``, ``taylor-2``): a tensor whose gradient arrives in two passes (tied input and
output embeddings: the head's in the full pass, the embedding's in block 0's) is folded once per
pass (``bench/big_model.py`` measures it: rank correlation 0.99999, same plan).  Members whose score
reads the largest input count of the model (the ``activation`` criterion's norm scales and
biases) are rescored once every piece has been seen (a CNN's stem sees the most rows, and runs
outside the blocks), so they are exact too.

**Curvature criteria and their updates.**  ``obs`` and ``surgeon`` gather their per-layer
statistics (``H``; K-FAC ``A`` and ``G``) one block at a time (:class:`SequentialCurvatureSource`):
each block's members are costed while its weights are onloaded, then its statistics are dropped,
so at most one block's factors exist at once.  ``H`` and ``A`` are exact (block inputs); ``G``
comes through the streamed backward above, so it is the in-memory one up to summation order.
After the plan, :func:`update_sequential` sweeps once more and computes each block's
compensated weights (``W_K += W_M H_MK H_KK⁻¹``; surgeon's ``Ã⁻¹``/``G̃⁻¹`` updates) while it is
loaded; they wait for the save in RAM up to a budget, then on disk.  Sequential mode prunes in one
shot (in memory ``shots="auto"`` re-gathers between shots for surgeon).  FLAP's bias
compensation needs no sweep: each block is onloaded once more and its compensated (or new) biases
come from the scoring pass' exact input means.

Data parallelism (:mod:`fxprune.distributed`) composes: each rank pushes its shard of the batches
through each block, and the block's sums are all-reduced once, before it is scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
import time
import types
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxprune.errors import AnalysisError, BadInputError, DataError, ModelLoadError, ScoringError
from fxprune.graph import PrunableGraph
from fxprune.io import Checkpoint, save_streamed_into
from fxprune.passes.base import check, fxpass
from fxprune.passes.capture import _aliases
from fxprune.passes.curvature import CurvatureSource
from fxprune.passes.scoring import (
    AGGREGATES, IMPORTANCE, NORMALIZERS, Importance, ScoringContext, Scores, Target, _all_group_scores,
    _collect_targets, _fill_input_stats, _gradient_session, _input_hooks, _input_means, _lookup, check_loss,
)
from fxprune.passes.stats import (
    Collector, Stats, StatSpec, _sampled_loss, any_needs_backward, combine_stats, frozen_params, layers_for, spec_of,
)
from fxprune.util import hf
from fxprune.util.loss import Batch, LossFn, count_tokens, model_loss
from fxprune.util.modules import call, resolve_device, set_tensor, to_device
from fxprune.util.names import block_of_name, split_block

__all__ = [
    "RESIDENT", "POST", "BlockCut", "BlockTiming", "SequentialScores", "SequentialPruneResult", "MemoryEstimate",
    "cut_blocks", "meta_twin", "skeleton_from_checkpoint", "score_sequential", "gather_stats_sequential",
    "prune_sequential", "save_sequential", "save_sequential_into", "estimate_memory", "needs_sequential",
    "SequentialCurvatureSource", "update_sequential", "write_sequential_checkpoint",
]

RESIDENT = "<resident>"  # outside tensors used before or between the blocks (loaded throughout)
POST = "<post>"  # outside tensors used only after the last block (final norm, head)
_OUTSIDE = (RESIDENT, POST)


# ------------------------------------------------------------------------------------------
# The cut
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockCut:
    """The model cut at its repeated blocks (see the module docs), read from the exported graph.

    ``blocks``: module paths in execution order.  ``tensors``: for each block, and for
    :data:`RESIDENT`/:data:`POST`, the canonical tensor FQNs it owns.  ``stream``: per block,
    the graph values it reads from the previous block (the residual stream); ``shared``: those
    it reads from outside the blocks (masks, position embeddings, inputs).  ``chain_only``: the
    blocks whose outputs only the next block reads (their outputs can be dropped once it ran).
    """

    blocks: tuple[str, ...]
    tensors: Mapping[str, tuple[str, ...]]
    stream: Mapping[str, tuple[str, ...]]
    shared: Mapping[str, tuple[str, ...]]
    chain_only: frozenset[str]

    @property
    def pieces(self) -> tuple[str, ...]:
        return (RESIDENT, *self.blocks, POST)

    def piece_of(self, fqn: str) -> str:
        for piece, names in self.tensors.items():
            if fqn in names:
                return piece
        raise KeyError(fqn)

    def describe(self) -> str:
        first = self.blocks[0]
        return (f"{len(self.blocks)} blocks ({first} ... {self.blocks[-1]}); {len(self.tensors[RESIDENT])} resident "
                f"and {len(self.tensors[POST])} post tensors outside them; {first} reads "
                f"{len(self.shared[first])} shared values; residual stream between blocks: "
                f"{', '.join(self.stream[self.blocks[1]]) if len(self.blocks) > 1 else '-'}")


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"\['([^']+)'\]", r".\1", path).strip(".")


def _requires_graph(graph: Any, *args: Any, **kwargs: Any) -> None:
    check(isinstance(graph, PrunableGraph), BadInputError, "cut_blocks() needs the PrunableGraph from fxprune.trace")


@fxpass("cut_blocks", requires=_requires_graph)
def cut_blocks(graph: PrunableGraph) -> BlockCut:
    """Cut ``graph`` into its repeated blocks at the residual stream (see :class:`BlockCut`)."""
    model = graph.module
    ep = graph.exported_program
    sig = ep.graph_signature
    fqn_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, b in model.named_buffers(remove_duplicate=False) if b is not None]
    candidates = {b for b in (block_of_name(graph.canonical(n)) for n in names) if split_block(b)}
    nodes = list(ep.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    where: dict[torch.fx.Node, str | None] = {}
    for n in nodes:
        path = _module_path(n) if n.op == "call_function" else None
        b = block_of_name(path) if path else None
        where[n] = b if b in candidates else None
    spans: dict[str, list[int]] = {}
    for n, b in where.items():
        if b is not None:
            spans.setdefault(b, []).append(index[n])
    if not spans:
        raise BadInputError(
            f"{type(model).__name__} has no repeated blocks (modules named like model.layers.<i> that hold "
            "weights); sequential mode runs a model one block at a time")
    order = tuple(sorted(spans, key=lambda b: spans[b][0]))
    owner_at = {i: b for b, idx in spans.items() for i in idx}
    for b in order:
        lo, hi = spans[b][0], spans[b][-1]
        other = next((owner_at[i] for i in range(lo, hi + 1) if owner_at.get(i, b) != b), None)
        if other is not None:
            raise AnalysisError(f"blocks {b} and {other} interleave in the graph; sequential mode needs the blocks "
                                "to run one after the other")
    last_block_end = spans[order[-1]][-1]

    tensors: dict[str, list[str]] = {p: [] for p in (RESIDENT, *order, POST)}
    users_of: dict[str, list[torch.fx.Node]] = {}  # canonical tensor -> its users (tied: every placeholder's)
    for n in nodes:
        if n.op == "placeholder" and n.name in fqn_of:
            users_of.setdefault(graph.canonical(fqn_of[n.name]), []).extend(n.users)
    placed: set[str] = set()
    for canonical, users in users_of.items():
        placed.add(canonical)
        home = block_of_name(canonical)
        if home in candidates and {where[u] for u in users} <= {home}:
            tensors[home].append(canonical)
        elif any(index[u] <= last_block_end for u in users):
            tensors[RESIDENT].append(canonical)
        else:
            tensors[POST].append(canonical)
    for name in names:  # tensors the graph never reads still belong somewhere (they are saved)
        canonical = graph.canonical(name)
        if canonical not in placed:
            placed.add(canonical)
            home = block_of_name(canonical)
            tensors[home if home in candidates else POST].append(canonical)

    stream: dict[str, tuple[str, ...]] = {}
    shared: dict[str, tuple[str, ...]] = {}
    chain_only: set[str] = set()
    for j, b in enumerate(order):
        prev = order[j - 1] if j else None
        reads_prev, reads_shared = set(), set()
        for i in spans[b]:
            for a in nodes[i].all_input_nodes:
                if where[a] == b or (a.op == "placeholder" and a.name in fqn_of):
                    continue
                (reads_prev if where[a] == prev and prev is not None else reads_shared).add(a.name)
        stream[b], shared[b] = tuple(sorted(reads_prev)), tuple(sorted(reads_shared))
        consumers = {where[u] if u.op != "output" else "<output>"
                     for i in spans[b] for u in nodes[i].users if where[u] != b}
        if j + 1 < len(order) and consumers == {order[j + 1]}:
            chain_only.add(b)
    return BlockCut(order, types.MappingProxyType({k: tuple(v) for k, v in tensors.items()}),
                    types.MappingProxyType(stream), types.MappingProxyType(shared), frozenset(chain_only))


# ------------------------------------------------------------------------------------------
# The model without its weights
# ------------------------------------------------------------------------------------------
def hf_model_class(config: Any) -> type:
    """The transformers class a config's ``architectures`` names (else its AutoModel class)."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls if cls is not None else transformers.AutoModel._model_mapping[type(config)]


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of the skeleton with its buffers on meta too, for tracing: export refuses a graph
    mixing real buffers (BatchNorm statistics) with meta activations.  Names and ties are kept."""
    import copy

    return copy.deepcopy(model).to("meta")


def skeleton_from_checkpoint(directory: str, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The checkpoint's model with every parameter on ``meta`` and real (tiny) buffers.

    Real buffers matter: non-persistent ones (RoPE ``inv_freq``) are not in the checkpoint and are
    computed by the constructor.  ``factory`` builds a non-HF model (default: the class named by
    ``config.json``).
    """
    from accelerate import init_empty_weights

    if factory is None:
        import transformers

        if not os.path.exists(os.path.join(directory, "config.json")):
            raise ModelLoadError(f"{directory} has no config.json; pass factory= for a non-HF model")
        config = transformers.AutoConfig.from_pretrained(directory)
        cls = hf_model_class(config)

        def factory() -> nn.Module:
            return cls._from_config(config)

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = factory()
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # init_empty_weights re-registered every parameter, which untied them
    return model.eval()


def checkpoint_names(model: nn.Module, checkpoint: Checkpoint) -> tuple[dict[str, str], list[str]]:
    """Model tensor name -> checkpoint tensor name, and the layout conversions that were not applied.

    Transformers saves some models under legacy names (GPT-NeoX's ``embed_out``, ``gamma``/``beta``)
    and renames them at load; those pure renamings are applied here (transformers' own mapping).
    Layout conversions (per-expert tensors fused into one) need every part at once and are only
    reported.
    """
    names = {n: n for n in checkpoint.files}
    skipped: list[str] = []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    except Exception:  # noqa: BLE001 - not a transformers model, or another transformers version
        return names, skipped
    renamings = [t for t in transforms if type(t) is WeightRenaming]
    skipped = sorted({f"{t.source_patterns} -> {t.target_patterns}" for t in transforms if type(t) is not WeightRenaming})
    for key in checkpoint.files:
        new = key
        for t in renamings:
            new, _ = t.rename_source_key(new)
        if new != key:
            names.setdefault(new, key)
    return names, skipped


class _Loader:
    """Onloads tensors from the checkpoint into the skeleton (every alias) and offloads them to meta."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, aliases: Mapping[str, list[str]],
                 device: torch.device, dtype: torch.dtype | None) -> None:
        self.model, self.checkpoint, self.aliases = model, checkpoint, aliases
        self.device, self.dtype = device, dtype
        self.loaded: set[str] = set()
        self.bytes_loaded = 0
        self.names, self.conversions = checkpoint_names(model, checkpoint)

    def source(self, canonical: str) -> str | None:
        return next((self.names[a] for a in self.aliases.get(canonical, [canonical]) if a in self.names), None)

    def _current(self, canonical: str) -> torch.Tensor | None:
        mod_path, _, attr = canonical.rpartition(".")
        return getattr(self.model.get_submodule(mod_path) if mod_path else self.model, attr, None)

    def load(self, canonicals: Iterable[str]) -> None:
        wanted: dict[str, str] = {}
        for c in canonicals:
            src = self.source(c)
            if src is None:
                cur = self._current(c)
                if isinstance(cur, torch.Tensor) and cur.device.type == "meta":
                    hint = (f"; transformers converts this checkpoint's layout at load ({', '.join(self.conversions[:3])}), "
                            "which sequential mode cannot stream: re-save it with the model's own tensor names"
                            if self.conversions else "")
                    raise ModelLoadError(f"{self.checkpoint.directory} has no weights for {c}{hint}")
                continue  # a buffer the constructor computed (RoPE inv_freq)
            wanted[c] = src
        values = self.checkpoint.read(wanted.values(), self.device)
        for c, src in wanted.items():
            value = values[src]
            if self.dtype is not None and value.is_floating_point():
                value = value.to(self.dtype)
            self._put(c, value)
            self.loaded.add(c)
            self.bytes_loaded += value.numel() * value.element_size()

    def unload(self, canonicals: Iterable[str]) -> None:
        for c in canonicals:
            if c in self.loaded:
                cur = self._current(c)
                self._put(c, torch.empty_like(cur, device="meta"))
                self.loaded.discard(c)
                self.bytes_loaded -= cur.numel() * cur.element_size()

    def _put(self, canonical: str, value: torch.Tensor) -> None:
        old = self._current(canonical)
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        for alias in self.aliases.get(canonical, [canonical]):
            set_tensor(self.model, alias, value)


# ------------------------------------------------------------------------------------------
# Saved block outputs (and their gradients)
# ------------------------------------------------------------------------------------------
class _Store:
    """Per (block, batch) pytrees of tensors on the CPU; past ``ram_bytes`` they go to disk files
    that are memory-mapped when read back."""

    def __init__(self, ram_bytes: int, spill_dir: str | None) -> None:
        self.ram_bytes, self.spill_dir = ram_bytes, spill_dir
        self._ram: dict[tuple[str, int], tuple[list[Any], Any, int]] = {}
        self._disk: dict[tuple[str, int], tuple[str, Any, int]] = {}
        self.in_ram = self.on_disk = self.peak_ram = self.peak_disk = 0
        self._tmp: str | None = None
        self._n = 0

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._ram or key in self._disk

    def put(self, key: tuple[str, int], value: Any) -> None:
        self.drop(key)
        leaves, spec = pytree.tree_flatten(value)
        leaves = [t.detach().to("cpu") if isinstance(t, torch.Tensor) else t for t in leaves]
        size = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        if self.in_ram + size <= self.ram_bytes:
            self._ram[key] = (leaves, spec, size)
            self.in_ram += size
            self.peak_ram = max(self.peak_ram, self.in_ram)
            return
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="fxprune-activations-", dir=self.spill_dir)
        path = os.path.join(self._tmp, f"{self._n}.pt")
        self._n += 1
        torch.save([t.contiguous() if isinstance(t, torch.Tensor) else t for t in leaves], path)
        self._disk[key] = (path, spec, size)
        self.on_disk += size
        self.peak_disk = max(self.peak_disk, self.on_disk)

    def get(self, key: tuple[str, int]) -> Any:
        if key in self._ram:
            leaves, spec, _ = self._ram[key]
            return pytree.tree_unflatten(leaves, spec)
        path, spec, _ = self._disk[key]
        return pytree.tree_unflatten(torch.load(path, mmap=True, weights_only=True), spec)

    def add(self, key: tuple[str, int], value: dict[int, torch.Tensor]) -> None:
        """Accumulate ``{leaf index: tensor}`` into the entry at ``key`` (gradients from several passes)."""
        if key not in self:
            self.put(key, value)
            return
        summed = dict(self.get(key))
        for j, t in value.items():
            t = t.detach().to("cpu")
            summed[j] = summed[j] + t if j in summed else t
        self.put(key, summed)

    def drop(self, key: tuple[str, int]) -> None:
        if key in self._ram:
            self.in_ram -= self._ram.pop(key)[2]
        elif key in self._disk:
            path, _, size = self._disk.pop(key)
            self.on_disk -= size
            os.unlink(path)

    def drop_block(self, block: str) -> None:
        for key in [k for k in (*self._ram, *self._disk) if k[0] == block]:
            self.drop(key)

    def close(self) -> None:
        for key in list(self._disk):
            self.drop(key)
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._tmp)


# ------------------------------------------------------------------------------------------
# Running the model's own forward with blocks replayed
# ------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the live block once it ran: nothing after it is needed in this pass."""


class _Runner:
    """The skeleton's forward with every block's ``forward`` replaced for one pass (module docs)."""

    def __init__(self, model: nn.Module, cut: BlockCut, store: _Store, device: torch.device) -> None:
        self.model, self.cut, self.store, self.device = model, cut, store, device
        self.modules = {b: model.get_submodule(b) for b in cut.blocks}
        self.position = {b: i for i, b in enumerate(cut.blocks)}
        self.batch = 0
        self.calls: list[str] = []
        self.leaves: dict[str, list[Any]] = {}
        self.captured: Any = None
        self._standin: Any = None

    @contextlib.contextmanager
    def patched(self, live: str | None, grad: bool) -> Iterator[None]:
        """Blocks before ``live`` replay, ``live`` runs and stops the forward, later ones must not run
        (``live=None``: every block replays and the forward runs to the end)."""
        limit = self.position[live] if live is not None else len(self.cut.blocks)
        last = self.cut.blocks[limit - 1] if limit else None  # the replayed block whose output is live
        originals = {b: m.forward for b, m in self.modules.items()}
        own = {b: m.__dict__.get("forward") for b, m in self.modules.items()}  # e.g. accelerate's hooks
        for b, m in self.modules.items():
            pos = self.position[b]
            if pos < limit:
                # a block only the next (itself replayed) block reads gets a stand-in, not its own copy
                standin = (b != last and b in self.cut.chain_only and pos + 1 < limit
                           and type(m) is type(self.modules[last]))
                m.forward = self._replay(b, last if standin else b, grad)
            elif pos == limit:
                m.forward = self._live(b, originals[b])
            else:
                m.forward = self._unexpected(b, live)
        try:
            yield
        finally:
            self._standin = None
            for b, m in self.modules.items():
                m.__dict__.pop("forward", None)
                if own[b] is not None:
                    m.forward = own[b]

    def _replay(self, block: str, source: str, grad: bool) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(block)
            if self._standin is None or self._standin[0] != (source, self.batch):
                leaves, spec = pytree.tree_flatten(self.store.get((source, self.batch)))
                out = []
                for t in leaves:
                    if isinstance(t, torch.Tensor):
                        t = t.to(self.device, copy=True)
                        if grad and t.is_floating_point():
                            t.requires_grad_(True)
                    out.append(t)
                value = pytree.tree_unflatten(out, spec)
                if source != block:  # keep the stand-in: the block it stands for replays it later
                    self._standin = ((source, self.batch), out, value)
            else:
                _, out, value = self._standin
            if source == block:
                self._standin = None
                if grad:
                    self.leaves[block] = out
            return value

        return forward

    def _live(self, block: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(block)
            self.captured = original(*args, **kwargs)
            raise _Stop

        return forward

    def _unexpected(self, block: str, live: str | None) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            raise AnalysisError(f"block {block} ran before {live}: the blocks do not run in the order the graph "
                                "shows, so sequential mode cannot replay them")

        return forward

    def _check_calls(self, live: str | None) -> None:
        n = self.position[live] + 1 if live is not None else len(self.cut.blocks)
        if self.calls != list(self.cut.blocks[:n]):
            twice = next((b for b in set(self.calls) if self.calls.count(b) > 1), None)
            why = f"{twice} ran twice (weights shared across depth?)" if twice else f"the calls were {self.calls[:6]}"
            raise AnalysisError(f"sequential mode needs each block to run once per forward, in order; {why}")

    def run_block(self, live: str, i: int, batch: Batch, *, grad: bool) -> Any:
        """Forward of batch ``i`` up to and including block ``live``; returns its output."""
        self.batch, self.calls, self.leaves, self.captured = i, [], {}, None
        with self.patched(live, grad), (torch.enable_grad() if grad else torch.no_grad()):
            try:
                call(self.model, _inputs(self.model, batch))
            except _Stop:
                pass
        if self.captured is None:
            raise AnalysisError(f"the forward finished without running block {live}")
        self._check_calls(live)
        out, self.captured = self.captured, None
        return out

    def run_full(self, i: int, batch: Batch, fn: Callable[[nn.Module, Batch], Any], *, grad: bool) -> Any:
        """``fn(model, batch)`` (the loss, or the forward) with every block replayed."""
        self.batch, self.calls, self.leaves = i, [], {}
        with self.patched(None, grad), (torch.enable_grad() if grad else torch.no_grad()):
            out = fn(self.model, batch)
        self._check_calls(None)
        return out

    def collect_grads(self) -> None:
        """Add the gradients that reached the replayed outputs of this pass to their blocks' store."""
        for block, leaves in self.leaves.items():
            grads = {j: t.grad for j, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.grad is not None}
            if grads:
                self.store.add((_GRAD + block, self.batch), grads)
        self.leaves = {}


_GRAD = "grad:"  # store key prefix of the gradients at a block's output


def _inputs(model: nn.Module, batch: Batch) -> Batch:
    return {**batch, **hf.cache_off(model)} if isinstance(batch, Mapping) else batch


# ------------------------------------------------------------------------------------------
# What a sweep feeds: a criterion and/or statistics, piece by piece
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _PieceContext(ScoringContext):
    """A piece's scoring context; ``floor_tokens`` carries the largest input count seen so far."""

    floor_tokens: int = 0

    @property
    def max_tokens(self) -> int:
        return max(super().max_tokens, self.floor_tokens)


class _Router(Importance):
    """One gradient session for several criteria (a block's and the outside's): route by parameter."""

    def __init__(self, owners: Mapping[int, Importance]) -> None:
        super().__init__()
        self.owners = owners

    def on_grad(self, target: Target, grad: torch.Tensor) -> None:
        self.owners[id(target.param)].on_grad(target, grad)


class _Cached(Importance):
    """The criterion at the end of a run: member scores come from the per-piece cache."""

    def __init__(self, crit: Importance, cache: Mapping[tuple, np.ndarray | None]) -> None:
        super().__init__(crit.seed)
        self.name, self.cache = crit.name, cache

    def member_scores(self, group, member, target, ctx):  # noqa: ANN001 - Importance's signature
        return self.cache.get(_member_key(group, member))


def _member_key(group: Any, member: Any) -> tuple:
    return (group.id, member.name, member.dim, member.layout, member.class_id)


class _Consumers:
    """Scoring (a criterion from :data:`IMPORTANCE`) and/or statistics (a :class:`StatSpec`) per piece."""

    def __init__(self, model: nn.Module, analysis: Any, cut: BlockCut, *, importance: str | None, seed: int,
                 spec: StatSpec | None, stats_device: torch.device, stats_dtype: torch.dtype,
                 dist: Any, keep_stats: bool, on_block: Callable[[str, nn.Module, Stats], None] | None) -> None:
        self.model, self.analysis, self.cut = model, analysis, cut
        self.graph = analysis.graph
        self.groups = list(analysis.groups)
        self.crit_cls = _lookup(IMPORTANCE, importance, "importance criterion") if importance else None
        self.seed, self.spec, self.dist = seed, spec, dist
        self.stats_device, self.stats_dtype = stats_device, stats_dtype
        self.keep_stats, self.on_block = keep_stats, on_block
        self.cache: dict[tuple, np.ndarray | None] = {}
        self.means: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.stat_parts: list[Stats] = []
        self.deferred: list[tuple[Any, Any, Target, _PieceContext, Importance, int]] = []
        self.max_count = 0
        self.n_batches = self.local_batches = 0
        self.tokens = 0
        self.fisher = "empirical"
        piece_tensors = {t: p for p, ts in cut.tensors.items() for t in ts}
        self.members: dict[str, list[tuple[Any, Any]]] = {p: [] for p in cut.pieces}
        for g in self.groups:
            for m in g.params:
                self.members[piece_tensors[self.graph.canonical(m.name)]].append((g, m))
        block_of_module = {}
        layers = layers_for(model, spec) if spec else {}
        for name in layers:
            block_of_module[name] = _owner(cut.blocks, name)
        self.stat_layers = {p: {n: layers[n] for n, b in block_of_module.items() if b == p} for p in cut.blocks}
        self.stat_layers[RESIDENT] = {n: layers[n] for n, b in block_of_module.items() if b == RESIDENT}
        # outside pieces: one criterion and (for gradients) one collector kept across every pass
        self.outside_crit: Importance | None = None
        self.outside_targets: dict[int, Target] = {}
        self.outside_ctx: _PieceContext | None = None
        self.outside_grad_col: Collector | None = None
        self.outside_in_col: Collector | None = None

    @property
    def needs_grad(self) -> bool:
        return bool((self.crit_cls and self.crit_cls.needs_grad) or (self.spec and any_needs_backward(self.spec)))

    @property
    def needs_data(self) -> bool:
        return bool((self.crit_cls and self.crit_cls().needs_data) or self.spec)

    def _targets(self, pieces: Sequence[str]) -> dict[int, Target]:
        """The scoring targets (loaded parameters) of the members living in ``pieces``."""
        if self.crit_cls is None:
            return {}
        wanted = {t for p in pieces for t in self.cut.tensors[p]}
        groups = list(dict.fromkeys(g for p in pieces for g, _ in self.members[p]))
        return {pid: t for pid, t in _collect_targets(self.model, groups).items()
                if self.graph.canonical(t.name) in wanted}

    # -- per piece state ------------------------------------------------------------------------
    def open_piece(self, piece: str) -> "_Piece":
        outside = piece in _OUTSIDE
        if outside and self.outside_crit is not None:
            return _Piece(piece, self.outside_crit, self.outside_targets, self.outside_ctx)
        crit = self.crit_cls(seed=self.seed) if self.crit_cls else None
        targets = self._targets(_OUTSIDE if outside else (piece,))
        ctx = _PieceContext(targets)
        if outside:
            self.outside_crit, self.outside_targets, self.outside_ctx = crit, targets, ctx
        return _Piece(piece, crit, targets, ctx)

    @contextlib.contextmanager
    def hooks(self, stack: contextlib.ExitStack, pieces: Sequence[tuple["_Piece", bool, bool]]) -> Iterator[list[tuple[Collector, bool]]]:
        """Hooks for one pass: ``(piece, inputs, grads)`` says which side each piece gathers.

        Yields the collectors to call ``next_batch`` on (with whether they take the batch's scale).
        """
        cols: list[tuple[Collector, bool]] = []
        grad_targets: dict[int, Target] = {}
        owners: dict[int, Importance] = {}
        for p, inputs, grads in pieces:
            if p.crit is not None and inputs and p.crit.needs_inputs:
                p.input_col = stack.enter_context(_input_hooks(p.targets, p.ctx))
                cols.append((p.input_col, False))
            if p.crit is not None and grads and p.crit.needs_grad:
                grad_targets.update(p.targets)
                owners.update({pid: p.crit for pid in p.targets})
            if self.spec is not None:
                cols.extend(self._stat_collectors(stack, p, inputs, grads))
        if grad_targets:
            stack.enter_context(_gradient_session(self.model, grad_targets, _Router(owners)))
        elif any(g for _, _, g in pieces):
            stack.enter_context(frozen_params(self.model))
        yield cols

    def _stat_collectors(self, stack: contextlib.ExitStack, p: "_Piece", inputs: bool,
                         grads: bool) -> list[tuple[Collector, bool]]:
        spec = self.spec
        assert spec is not None
        layers = self.stat_layers.get(p.name if p.name not in _OUTSIDE else RESIDENT, {})
        if not layers:
            return []
        out = []
        if p.name in _OUTSIDE:  # input side in the final pass only; output gradients in every backward pass
            if inputs and self.outside_in_col is None:
                in_side = {n: dataclasses.replace(s, grad_cov=False, grad_input_sq=False, output_taylor=False,
                                                  param_fisher=())
                           for n, s in ((n, spec_of(spec, n)) for n in layers) if s.input_moments or s.input_cov}
                if in_side:
                    self.outside_in_col = Collector({n: layers[n] for n in in_side}, in_side,
                                                    device=self.stats_device, dtype=self.stats_dtype)
            if inputs and self.outside_in_col is not None:
                out.append((stack.enter_context(self.outside_in_col), False))
            if grads and self.outside_grad_col is None:
                grad_side = {n: StatSpec(grad_cov=s.grad_cov, grad_input_sq=s.grad_input_sq,
                                         output_taylor=s.output_taylor, bias_column=s.bias_column,
                                         param_fisher=s.param_fisher)
                             for n, s in ((n, spec_of(spec, n)) for n in layers) if s.needs_backward}
                if grad_side:
                    self.outside_grad_col = Collector({n: layers[n] for n in grad_side}, grad_side,
                                                      device=self.stats_device, dtype=self.stats_dtype)
            if grads and self.outside_grad_col is not None:
                out.append((stack.enter_context(self.outside_grad_col), True))
            return out
        if inputs:
            p.stat_col = Collector(layers, spec, device=self.stats_device, dtype=self.stats_dtype)
            out.append((stack.enter_context(p.stat_col), any_needs_backward(spec)))
        return out

    # -- finishing a piece: reduce over ranks, score, hand on the statistics ----------------------
    def finish(self, p: "_Piece") -> None:
        if p.crit is not None:
            ctx = p.ctx
            if p.input_col is not None:
                _fill_input_stats(p.input_col, ctx)
            ctx.n_batches = self.local_batches  # summed over the ranks by the reduction
            if self.dist is not None:
                self.dist.reduce_scoring(p.crit, ctx, 0)
            self.max_count = max(self.max_count, ctx.max_tokens)
            ctx.floor_tokens = self.max_count
            used = ctx.max_tokens
            light: _PieceContext | None = None  # what a deferred rescoring needs, without the block's weights
            for g, m in self.members[p.name] if p.name not in _OUTSIDE else self.members[RESIDENT] + self.members[POST]:
                target = ctx.by_name.get(m.name)
                if target is None:
                    continue
                value = p.crit.member_scores(g, m, target, ctx)
                self.cache[_member_key(g, m)] = value
                # does this member read the largest input count (weight-only members of ``activation``)?
                # A later piece may see more rows (a CNN's stem): keep its small weight and rescore it
                ctx.floor_tokens = used + 1
                probe = p.crit.member_scores(g, m, target, ctx)
                ctx.floor_tokens = used
                if value is not None and probe is not None and not np.array_equal(value, probe):
                    kept = dataclasses.replace(target, param=target.param.detach().to("cpu", copy=True))
                    if light is None:
                        light = _PieceContext({}, dict(ctx.input_stats), ctx.n_batches, floor_tokens=used)
                    light.targets[id(kept.param)] = kept
                    self.deferred.append((g, m, kept, light, p.crit, used))
            means, counts = _input_means(p.targets, ctx)
            self.means.update(means)
            self.counts.update(counts)
            p.crit._acc.clear()
        if self.spec is not None:
            part = self._piece_stats(p)
            if part is not None:
                if self.on_block is not None:
                    module = self.model if p.name in _OUTSIDE else self.model.get_submodule(p.name)
                    self.on_block(p.name, module, part)
                if self.keep_stats:
                    self.stat_parts.append(part)

    def _piece_stats(self, p: "_Piece") -> Stats | None:
        if p.name in _OUTSIDE:
            cols = [c for c in (self.outside_in_col, self.outside_grad_col) if c is not None]
            if not cols:
                return None
            parts = [c.result(self.tokens, self.fisher) for c in cols]
            if self.dist is not None:
                parts = [self.dist.reduce_stats(s) for s in parts]
            layers = dict(parts[0].layers)
            if len(parts) == 2:
                for name, g in parts[1].layers.items():
                    base = layers.get(name)
                    layers[name] = g if base is None else dataclasses.replace(base, ggT=g.ggT, gx_sq=g.gx_sq, yg=g.yg,
                                                                              grad_count=g.grad_count)
            return Stats(types.MappingProxyType(layers), self.spec, self.n_batches, self.tokens, self.fisher)
        if p.stat_col is None:
            return None
        part = p.stat_col.result(self.tokens, self.fisher)
        return self.dist.reduce_stats(part) if self.dist is not None else part

    # -- the results ------------------------------------------------------------------------------
    def scores(self, importance: str, aggregate: str, normalize: str | None) -> Scores:
        assert self.crit_cls is not None
        for g, m, target, ctx, piece_crit, used in self.deferred:  # now the largest count is known
            if used < self.max_count:
                ctx.floor_tokens = self.max_count
                self.cache[_member_key(g, m)] = piece_crit.member_scores(g, m, target, ctx)
        self.deferred.clear()
        crit = self.crit_cls(seed=self.seed)
        agg, norm = _lookup(AGGREGATES, aggregate, "aggregate"), _lookup(NORMALIZERS, normalize, "normalize")
        final: Importance = crit if type(crit).group_scores is not Importance.group_scores else _Cached(crit, self.cache)
        ctx = ScoringContext(_collect_targets(self.model, self.groups), n_batches=self.n_batches)
        by_group, raw = _all_group_scores(self.groups, final, ctx, agg, norm)
        return Scores(by_group, importance, aggregate, normalize, self.n_batches, self.tokens, self.means, self.counts,
                      raw, None, {}, crit.costs, dict(crit.uncosted_kinds), frozenset(ctx.unscored),
                      frozenset(ctx.fallback))

    def stats(self) -> Stats | None:
        if self.spec is None or not self.keep_stats:
            return None
        parts = [dataclasses.replace(s, spec=self.spec) for s in self.stat_parts]
        return combine_stats(parts, self.n_batches, self.tokens)


@dataclasses.dataclass
class _Piece:
    name: str
    crit: Importance | None
    targets: dict[int, Target]
    ctx: _PieceContext | None
    input_col: Collector | None = None
    stat_col: Collector | None = None


# ------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockTiming:
    """Seconds one block took: reading its weights, the calibration passes, and in all."""

    block: str
    load_s: float
    compute_s: float
    total_s: float
    weight_bytes: int


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False)


def _sweep(model: nn.Module, checkpoint: Checkpoint, cut: BlockCut, batches: Sequence[Batch], work: _Consumers, *,
           device: torch.device, dtype: torch.dtype | None, loss_fn: LossFn | None, fisher: str, seed: int,
           progress: bool, ram_bytes: int, offload_dir: str | None) -> tuple[list[BlockTiming], dict[str, int]]:
    """Run every piece once (twice with gradients); see the module docs for the passes."""
    loader = _Loader(model, checkpoint, _aliases(model), device, dtype)
    store = _Store(ram_bytes, offload_dir)
    runner = _Runner(model, cut, store, device)
    timings: list[BlockTiming] = []
    local = [to_device(b, device) for b in batches]
    work.n_batches = work.local_batches = len(local)
    work.tokens = sum(count_tokens(b) for b in local)
    work.fisher = fisher
    if work.dist is not None:
        from fxprune.distributed import all_reduce_flat

        counts = torch.tensor([float(work.n_batches), float(work.tokens), float(not local)], dtype=torch.float64)
        (counts,) = all_reduce_flat([counts], work.dist)
        work.n_batches, work.tokens = int(counts[0]), int(counts[1])
        if counts[2] and work.n_batches:
            raise DataError(f"{int(counts[2])} ranks got no calibration batch ({work.n_batches} batches for "
                            f"{work.dist.world_size} ranks); use fewer ranks or more batches")
    if work.n_batches == 0:
        raise DataError("no calibration batches: the batches iterable was empty")
    grad = work.needs_grad
    generator = torch.Generator().manual_seed(seed)

    def loss_of(m: nn.Module, batch: Batch) -> torch.Tensor:
        if fisher == "sampled":
            return _sampled_loss(m, batch, generator)
        return model_loss(m, batch, loss_fn)

    n_passes = len(cut.blocks) * (2 if grad else 1) + 1
    bar = _bar(n_passes, "sequential", progress)

    def timed_block(block: str, body: Callable[[], None]) -> None:
        t0, before = time.perf_counter(), loader.bytes_loaded
        loader.load(cut.tensors[block])
        t1 = time.perf_counter()
        weight_bytes = loader.bytes_loaded - before
        body()
        loader.unload(cut.tensors[block])
        t2 = time.perf_counter()
        timings.append(BlockTiming(block, t1 - t0, t2 - t1, t2 - t0, weight_bytes))
        bar.set_postfix(block=block, act_MB=f"{(store.in_ram + store.on_disk) / 2**20:.0f}")
        bar.update(1)

    def scale(batch: Batch) -> float:
        return float(max(count_tokens(batch), 1))

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            loader.load(cut.tensors[RESIDENT])
            if grad:
                loader.load(cut.tensors[POST])
            # 1. forward sweep: each block on the previous block's saved outputs
            for k, block in enumerate(cut.blocks):

                def forward_block(block: str = block, k: int = k) -> None:
                    piece = work.open_piece(block) if not grad else None
                    with contextlib.ExitStack() as stack:
                        cols = stack.enter_context(work.hooks(stack, [(piece, True, False)])) if piece else []
                        for i, batch in enumerate(local):
                            for col, scaled in cols:
                                col.next_batch(scale(batch) if scaled else 1.0)
                            store.put((block, i), runner.run_block(block, i, batch, grad=False))
                    if piece is not None:
                        work.finish(piece)
                    prev = cut.blocks[k - 1] if k else None
                    if not grad and prev in cut.chain_only and type(runner.modules[prev]) is type(runner.modules[block]):
                        store.drop_block(prev)  # later passes replay a stand-in for it (see _Runner.patched)

                timed_block(block, forward_block)
            # 2. the full forward with every block replayed (and, with gradients, the loss and its backward)
            if not grad:
                loader.load(cut.tensors[POST])
            outside = work.open_piece(RESIDENT)
            t0 = time.perf_counter()
            with contextlib.ExitStack() as stack:
                cols = stack.enter_context(work.hooks(stack, [(outside, True, grad)]))
                for i, batch in enumerate(local):
                    for col, scaled in cols:
                        col.next_batch(scale(batch) if scaled else 1.0)
                    if not grad:
                        runner.run_full(i, batch, lambda m, b: call(m, _inputs(m, b)), grad=False)
                        continue
                    loss = runner.run_full(i, batch, loss_of, grad=True)
                    check_loss(loss, i)
                    loss.backward()
                    _check_finite(work, outside, i)
                    runner.collect_grads()
            if not grad:
                work.finish(outside)
            bar.update(1)
            timings.append(BlockTiming("<outside>", 0.0, time.perf_counter() - t0, time.perf_counter() - t0,
                                       checkpoint.nbytes(loader.source(c) for c in (*cut.tensors[RESIDENT],
                                                                                    *cut.tensors[POST]))))
            # 3. with gradients: the backward sweep, last block first, each recomputed from its saved input
            if grad:
                for block in reversed(cut.blocks):

                    def backward_block(block: str = block) -> None:
                        piece = work.open_piece(block)
                        with contextlib.ExitStack() as stack:
                            cols = stack.enter_context(work.hooks(stack, [(piece, True, True), (outside, False, True)]))
                            for i, batch in enumerate(local):
                                for col, scaled in cols:
                                    col.next_batch(scale(batch) if scaled else 1.0)
                                out = runner.run_block(block, i, batch, grad=True)
                                key = (_GRAD + block, i)
                                if key in store:
                                    leaves = pytree.tree_leaves(out)
                                    pairs = [(leaves[j], g) for j, g in store.get(key).items() if leaves[j].requires_grad]
                                    if pairs:
                                        torch.autograd.backward([o for o, _ in pairs], [g.to(device) for _, g in pairs])
                                    store.drop(key)
                                _check_finite(work, piece, i)
                                runner.collect_grads()
                        work.finish(piece)
                        store.drop_block(block)

                    timed_block(block, backward_block)
                work.finish(outside)
    finally:
        bar.close()
        loader.unload(list(loader.loaded))
        peaks = {"activations_ram_peak_bytes": store.peak_ram, "activations_disk_peak_bytes": store.peak_disk}
        store.close()
    return timings, peaks


def _check_finite(work: _Consumers, piece: _Piece, i: int) -> None:
    bad = piece.crit.pop_nonfinite() if piece.crit is not None else None
    if bad is None and work.outside_crit is not None and work.outside_crit is not piece.crit:
        bad = work.outside_crit.pop_nonfinite()
    if bad is not None:
        raise ScoringError(f"batch {i}: non-finite gradient for parameter {bad!r}.")
    for col in (piece.stat_col, work.outside_grad_col):
        if col is not None and col.nonfinite:
            raise ScoringError(f"batch {i}: non-finite output gradient at layer {col.nonfinite!r}")


def _score_without_data(model: nn.Module, checkpoint: Checkpoint, cut: BlockCut, work: _Consumers, *,
                        device: torch.device, dtype: torch.dtype | None, progress: bool) -> list[BlockTiming]:
    """Weight-only criteria (l1, l2, random): onload each piece, score its members, offload."""
    return _each_piece(model, checkpoint, cut, lambda block: work.finish(work.open_piece(block)), device=device,
                       dtype=dtype, progress=progress)


def _each_piece(model: nn.Module, checkpoint: Checkpoint, cut: BlockCut, fn: Callable[[str], None], *,
                device: torch.device, dtype: torch.dtype | None, progress: bool,
                pieces: Sequence[str] | None = None) -> list[BlockTiming]:
    """Onload each block (and, as :data:`RESIDENT`, everything outside the blocks), call
    ``fn(piece)`` with its weights in ``model``, offload it: work that needs weights, not data."""
    loader = _Loader(model, checkpoint, _aliases(model), device, dtype)
    timings = []
    todo = [p for p in (*cut.blocks, RESIDENT) if pieces is None or p in pieces]
    bar = _bar(len(todo), "sequential", progress)
    try:
        for block in todo:
            t0 = time.perf_counter()
            names = (*cut.tensors[RESIDENT], *cut.tensors[POST]) if block == RESIDENT else cut.tensors[block]
            loader.load(names)
            t1 = time.perf_counter()
            fn(block)
            nbytes = loader.bytes_loaded
            loader.unload(names)
            timings.append(BlockTiming(block, t1 - t0, time.perf_counter() - t1, time.perf_counter() - t0, nbytes))
            bar.update(1)
    finally:
        bar.close()
        loader.unload(list(loader.loaded))
    return timings


def _owner(blocks: Sequence[str], name: str) -> str:
    """The block a module path lies in, or :data:`RESIDENT` for one outside every block."""
    return next((b for b in blocks if name == b or name.startswith(b + ".")), RESIDENT)


# ------------------------------------------------------------------------------------------
# The passes
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SequentialScores:
    """What a sequential run gathered: the in-memory ``Scores`` and/or ``Stats``, and its costs.

    ``stats`` is None unless statistics were asked for with ``keep_stats=True`` (for large models
    pass ``on_block=`` instead and use each block's statistics while it is loaded).
    ``activation_bytes`` holds the peak RAM and disk the saved block outputs took.
    """

    scores: Scores | None
    stats: Stats | None
    cut: BlockCut
    timings: tuple[BlockTiming, ...]
    activation_bytes: Mapping[str, int]
    mode: str  # "forward" (block-local) or "recompute" (streamed backward)

    @property
    def seconds(self) -> float:
        return sum(t.total_s for t in self.timings)


def _score_requires(model: Any, checkpoint: Any, analysis: Any, *args: Any, **kwargs: Any) -> None:
    check(isinstance(model, nn.Module), BadInputError, "score_sequential() needs the skeleton (skeleton_from_checkpoint)")
    check(isinstance(checkpoint, Checkpoint), BadInputError, "score_sequential() needs a fxprune.io.Checkpoint")
    check(hasattr(analysis, "groups") and hasattr(analysis, "graph"), BadInputError,
          "score_sequential() needs the Analysis of the skeleton (fxprune.analyze)")
    spec = kwargs.get("spec")
    check(spec is None or isinstance(spec, (StatSpec, Mapping)), BadInputError,
          "spec= is a StatSpec, or a {layer: StatSpec} mapping")


@fxpass("score_sequential", requires=_score_requires)
def score_sequential(
    model: nn.Module,
    checkpoint: Checkpoint,
    analysis: Any,
    batches: Sequence[Batch] | None = None,
    *,
    importance: str | None = "taylor",
    aggregate: str = "sum",
    normalize: str | None = "mean",
    spec: StatSpec | None = None,
    keep_stats: bool = True,
    on_block: Callable[[str, nn.Module, Stats], None] | None = None,
    cut: BlockCut | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    loss_fn: LossFn | None = None,
    fisher: str = "empirical",
    stats_device: str | torch.device = "cpu",
    stats_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    distributed: Any = None,
    ram_bytes: int | None = None,
    offload_dir: str | None = None,
    progress: bool = True,
    importance_options: Mapping[str, Any] | None = None,
) -> SequentialScores:
    """Score (and/or gather statistics for) a checkpoint's model one block at a time.

    The result equals ``fxprune.score(model, analysis, batches, importance=...)`` and
    ``gather_stats(model, batches, spec)`` on the loaded model (see the module docs for which
    criteria are exact and how gradients are streamed).

    Args:
        model: the skeleton (:func:`skeleton_from_checkpoint`); its parameters stay on meta.
        checkpoint: the weights (:meth:`fxprune.io.Checkpoint.open`).
        analysis: ``fxprune.analyze(fxprune.trace(meta_twin(model), ...))`` (the analysis of any
            instance of the same architecture serves: only tensor names are looked up).
        batches: calibration batches (this rank's shard when ``distributed``).
        importance: a criterion from ``IMPORTANCE``, or None for statistics only.  The curvature
            criteria (``obs``, ``surgeon``) gather their per-layer statistics block by block and
            cost each block's members while it is loaded (:class:`SequentialCurvatureSource`);
            ``importance_options`` are theirs (``damping``, ``relative``).
        spec: statistics to gather as well (a :class:`StatSpec`, or one per layer; ``Stats``, one
            block at a time); ``keep_stats``
            returns them all, ``on_block(block, module, stats)`` sees each block's while its weights
            are loaded.
        device: where blocks run (``"auto"``: CUDA if available); activations stay on the CPU.
        dtype: cast the loaded weights (default: the checkpoint's dtype).
        distributed: a :class:`fxprune.distributed.DistContext`: sums are all-reduced per block.
        ram_bytes: RAM for saved block outputs before they spill to ``offload_dir`` (default: a
            quarter of the available memory).
    """
    if importance is None and spec is None:
        raise BadInputError("score_sequential() needs importance= and/or spec=")
    if fisher not in ("empirical", "sampled"):
        raise BadInputError("fisher must be 'empirical' or 'sampled'")
    cut = cut or cut_blocks(analysis.graph)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:  # safetensors and NCCL want the index
        dev = torch.device("cuda", torch.cuda.current_device())
    crit_cls = _lookup(IMPORTANCE, importance, "importance criterion") if importance else None
    if crit_cls is not None and crit_cls.drives_data:
        check(spec is None, BadInputError, f"importance {importance!r} gathers its own statistics: drop spec=")
        if batches is None:
            raise DataError(f"importance {importance!r} needs calibration batches")
        sweep = dict(cut=cut, device=dev, dtype=dtype, loss_fn=loss_fn, fisher=fisher, stats_device=stats_device,
                     stats_dtype=stats_dtype, seed=seed, distributed=distributed, ram_bytes=ram_bytes,
                     offload_dir=offload_dir, progress=progress)
        return _score_curvature(model, checkpoint, analysis, list(batches), crit_cls, importance, aggregate,
                                normalize, importance_options, sweep)
    work = _Consumers(model, analysis, cut, importance=importance, seed=seed, spec=spec,
                      stats_device=torch.device(stats_device), stats_dtype=stats_dtype, dist=distributed,
                      keep_stats=keep_stats, on_block=on_block)
    if work.needs_data:
        if batches is None:
            raise DataError(f"importance {importance!r} needs calibration batches")
        timings, peaks = _sweep(model, checkpoint, cut, list(batches), work, device=dev, dtype=dtype, loss_fn=loss_fn,
                                fisher=fisher, seed=seed, progress=progress,
                                ram_bytes=ram_bytes if ram_bytes is not None else available_memory() // 4,
                                offload_dir=offload_dir)
    else:
        timings = _score_without_data(model, checkpoint, cut, work, device=dev, dtype=dtype, progress=progress)
        peaks = {"activations_ram_peak_bytes": 0, "activations_disk_peak_bytes": 0}
    scores = work.scores(importance, aggregate, normalize) if importance else None
    return SequentialScores(scores, work.stats(), cut, tuple(timings), types.MappingProxyType(peaks),
                            "recompute" if work.needs_grad else "forward")


def gather_stats_sequential(model: nn.Module, checkpoint: Checkpoint, analysis: Any, batches: Sequence[Batch],
                            spec: StatSpec, **kwargs: Any) -> Stats:
    """``gather_stats`` one block at a time: the same ``Stats`` as in memory (see :func:`score_sequential`)."""
    run = score_sequential(model, checkpoint, analysis, batches, importance=None, spec=spec, keep_stats=True, **kwargs)
    assert run.stats is not None
    return run.stats


# ------------------------------------------------------------------------------------------
# Curvature criteria (obs, surgeon) and their weight updates, block by block
# ------------------------------------------------------------------------------------------
class SequentialCurvatureSource(CurvatureSource):
    """Curvature statistics of a checkpoint's model, gathered one block at a time.

    Each gathering is one sequential sweep (:func:`score_sequential` with the criterion's
    per-layer :class:`StatSpec`): ``fn(layers, stats)`` of :meth:`each_chunk` runs on a block's
    layers while that block's weights are onloaded, then its statistics are dropped, so at most one
    block's ``H`` / ``A`` / ``G`` exist at a time whatever the model's size.  Scoring gathers once
    and the update gathers again on the same batches (in memory the update reuses the scoring
    statistics when they fit its budget; here they never outlive their block).  ``H`` and ``A``
    come from the block's exact inputs; ``G`` from the exact streamed backward (module docs).
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, analysis: Any, batches: Sequence[Batch], *,
                 sweep: Mapping[str, Any]) -> None:
        super().__init__(model, batches, loss_fn=sweep.get("loss_fn"), device=sweep.get("device", "auto"),
                         progress=sweep.get("progress", True))
        self.checkpoint, self.analysis, self.sweep = checkpoint, analysis, dict(sweep)
        self.runs: list[SequentialScores] = []
        self.n_batches = self.n_tokens = 0

    def iter_stats(self, model: nn.Module, specs: Mapping[str, Any]) -> Iterator[tuple[list[str], Any]]:
        raise NotImplementedError("sequential statistics exist only while their block is onloaded: use each_chunk()")

    def each_chunk(self, model: nn.Module, specs: Mapping[str, Any], fn: Callable[[list[str], Any], None]) -> None:
        if not specs:
            return
        blocks = self.sweep["cut"].blocks
        owner = {n: _owner(blocks, n) for n in specs}

        def on_block(block: str, module: nn.Module, stats: Stats) -> None:
            piece = RESIDENT if block in _OUTSIDE else block
            self.peak_stats_bytes = max(self.peak_stats_bytes, stats.nbytes)
            self.n_batches, self.n_tokens = stats.n_batches, stats.n_tokens
            fn([n for n, b in owner.items() if b == piece], stats)

        run = score_sequential(model, self.checkpoint, self.analysis, self.batches, importance=None, spec=dict(specs),
                               keep_stats=False, on_block=on_block, **self.sweep)
        self.gatherings += 1
        self.runs.append(run)


def _flap_sequential(model: nn.Module, analysis: Any, plan: Any, scores: Scores, method: str,
                     spill: Callable[[], "_SpilledTensors"], *, checkpoint: Checkpoint | None, cut: BlockCut | None,
                     device: Any, dtype: torch.dtype | None, progress: bool) -> Any:
    """flap: each block that has compensated layers onloaded once more (weights and the scoring
    pass' input means; no calibration sweep)."""
    from fxprune.errors import PlanError
    from fxprune.passes import curvature
    from fxprune.passes.update import IDENTITY, flap_compensation, flap_notes

    if checkpoint is None:
        raise PlanError("update_sequential(method='flap') needs checkpoint= (the weights are read block by block)")
    cut = cut or cut_blocks(analysis.graph)
    by_piece: dict[str, dict[str, tuple]] = {}
    for n, rc in curvature.layer_removals(model, analysis, plan).items():
        if len(rc[1]):
            by_piece.setdefault(_owner(cut.blocks, n), {})[n] = rc
    changed, added, skipped = spill(), spill(), []

    def piece(block: str) -> None:
        out = flap_compensation(model, analysis, plan, scores, removals=by_piece[block])
        for fqn, t in out.changed.items():
            changed[fqn] = t
        for fqn, t in out.added.items():
            added[fqn] = t
        skipped.extend(out.skipped)

    _each_piece(model, checkpoint, cut, piece, device=resolve_device(device), dtype=dtype, progress=progress,
                pieces=list(by_piece))
    return dataclasses.replace(IDENTITY, method="flap", changed=changed, added=added,
                               notes=flap_notes(changed, added, skipped))


def _score_curvature(model: nn.Module, checkpoint: Checkpoint, analysis: Any, batches: list[Batch], crit_cls: type,
                     importance: str, aggregate: str, normalize: str | None, options: Mapping[str, Any] | None,
                     sweep: Mapping[str, Any]) -> SequentialScores:
    """``score(importance="obs"/"surgeon")`` of the checkpoint's model, one block at a time."""
    try:
        crit = crit_cls(seed=sweep["seed"], **dict(options or {}))
    except TypeError as exc:
        raise ScoringError(f"importance {importance!r} does not take options {dict(options or {})}: {exc}") from None
    groups = list(analysis.groups)
    ctx = ScoringContext(_collect_targets(model, groups), model=model)
    source = SequentialCurvatureSource(model, checkpoint, analysis, batches, sweep=sweep)
    crit.source = source
    crit.run(model, groups, batches, ctx, device=sweep["device"], loss_fn=sweep["loss_fn"], progress=sweep["progress"])
    ctx.n_batches = source.n_batches
    agg, norm = _lookup(AGGREGATES, aggregate, "aggregate"), _lookup(NORMALIZERS, normalize, "normalize")
    by_group, raw = _all_group_scores(groups, crit, ctx, agg, norm)
    scores = Scores(by_group, importance, aggregate, normalize, source.n_batches, source.n_tokens, {}, {}, raw,
                    source, dict(crit.how), crit.costs, dict(crit.uncosted_kinds), frozenset(ctx.unscored),
                    frozenset(ctx.fallback))
    run = source.runs[-1] if source.runs else None
    return SequentialScores(scores, None, sweep["cut"], run.timings if run else (),
                            run.activation_bytes if run else types.MappingProxyType({}),
                            run.mode if run else "forward")


class _SpilledTensors(Mapping):
    """``{fqn: tensor}`` kept in RAM up to ``ram_bytes``, then in files under ``spill_dir`` (read
    back memory-mapped): a sequential update holds every touched layer's new weights until the
    save, which for a large model is more than the RAM sequential mode promises to use."""

    def __init__(self, ram_bytes: int, spill_dir: str | None) -> None:
        import weakref

        self._store = _Store(ram_bytes, spill_dir)
        self._keys: dict[str, None] = {}
        self._finalizer = weakref.finalize(self, self._store.close)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._store.put((key, 0), value)
        self._keys[key] = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._store.get((key, 0))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Delete the spilled files (also done when the mapping is garbage-collected)."""
        self._finalizer()


def update_sequential(model: nn.Module, analysis: Any, plan: Any, scores: Scores, *, method: str = "auto",
                      ram_bytes: int | None = None, offload_dir: str | None = None, checkpoint: Checkpoint | None = None,
                      cut: BlockCut | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      progress: bool = True) -> Any:
    """``fxprune.update`` for a sequential prune, block by block while each block is onloaded: the
    curvature updates (``obs``, ``surgeon``: one more sweep over the calibration batches) and FLAP's
    bias compensation (``flap``: weights and the scoring pass' input means only; needs
    ``checkpoint``).  The new tensors wait for :func:`save_sequential` in RAM up to ``ram_bytes``
    (default 512 MiB), then on disk under ``offload_dir``.  Returns a
    :class:`~fxprune.passes.update.WeightUpdate` (``added``: biases flap gives bias-free layers)."""
    from fxprune.errors import PlanError
    from fxprune.passes.update import IDENTITY

    if method == "auto":
        method = scores.update_method
    if method == "none" or not plan:
        return dataclasses.replace(IDENTITY, method=method)
    run = _SEQUENTIAL_UPDATES.get(method)
    if run is None:
        raise PlanError(f"sequential mode applies the updates {sorted(_SEQUENTIAL_UPDATES)}; got {method!r} "
                        "(use update='none')")
    budget = 512 * 2**20 if ram_bytes is None else ram_bytes
    return run(model, analysis, plan, scores, method, lambda: _SpilledTensors(budget, offload_dir),
               checkpoint=checkpoint, cut=cut, device=device, dtype=dtype, progress=progress)


def _curvature_sequential(model: nn.Module, analysis: Any, plan: Any, scores: Scores, method: str,
                          spill: Callable[[], "_SpilledTensors"], **_: Any) -> Any:
    """obs / surgeon: :func:`~fxprune.passes.curvature.plan_update` on the scoring pass'
    :class:`SequentialCurvatureSource`, which sweeps once more and runs it block by block."""
    from fxprune.errors import PlanError
    from fxprune.passes import curvature
    from fxprune.passes.update import IDENTITY

    source = scores.stats
    if not isinstance(source, SequentialCurvatureSource):
        raise PlanError(f"update {method!r} in sequential mode needs importance='obs'/'surgeon' scores, got "
                        f"importance {scores.importance!r} (use update='none')")
    changed, notes = curvature.plan_update(model, analysis, plan, source, method,
                                           damping=getattr(source, "damping", curvature.DAMPING), out=spill())
    return dataclasses.replace(IDENTITY, method=method, changed=changed, notes=tuple(notes))


_SEQUENTIAL_UPDATES: dict[str, Callable[..., Any]] = {
    "obs": _curvature_sequential, "surgeon": _curvature_sequential, "flap": _flap_sequential,
}
"""How each method of :data:`fxprune.passes.update.UPDATES` runs block by block."""


# ------------------------------------------------------------------------------------------
# Memory: how much sequential mode needs, and whether in-memory pruning would fit
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes sequential mode holds at its peak on the compute device (see :func:`estimate_memory`)."""

    largest_block: int
    resident: int
    post: int
    activations: int  # one batch's working set inside a block (estimate)
    stats: int

    @property
    def device_peak(self) -> int:
        return self.largest_block + self.resident + self.post + self.activations + self.stats


def estimate_memory(cut: BlockCut, tensor_bytes: Mapping[str, int], *, tokens_per_batch: int, hidden: int,
                    intermediate: int, dtype_bytes: int = 2, stats_bytes: int = 0) -> MemoryEstimate:
    """The device memory of a sequential run: the largest block's weights, the outside weights, one
    batch's activations inside a block (hidden states in and out, attention q/k/v/o and the MLP's
    two intermediate tensors, ``tokens * (6*hidden + 2*intermediate) * dtype_bytes``) and the stats."""
    def total(names: Iterable[str]) -> int:
        return sum(tensor_bytes.get(n, 0) for n in names)

    largest = max((total(cut.tensors[b]) for b in cut.blocks), default=0)
    act = tokens_per_batch * (6 * hidden + 2 * intermediate) * dtype_bytes
    return MemoryEstimate(largest, total(cut.tensors[RESIDENT]), total(cut.tensors[POST]), act, stats_bytes)


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free bytes on ``device``: ``MemAvailable`` for the CPU, ``cudaMemGetInfo`` for a GPU."""
    dev = torch.device(device) if str(device) != "auto" else resolve_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


IN_MEMORY_FACTOR = 3.0
"""In-memory pruning holds the weights about three times at its peak: the model, the rewritten copy
and the zeroed copy verification compares it with."""


def needs_sequential(directory: str, device: str | torch.device = "auto", *,
                     available: int | None = None) -> tuple[bool, str]:
    """Whether in-memory pruning of the checkpoint in ``directory`` would not fit, and why
    (``available``: free bytes to compare with; default: what the device has free now)."""
    try:
        size = Checkpoint.open(directory).nbytes()
    except ModelLoadError:
        return False, "no safetensors checkpoint to stream from"
    dev = resolve_device(device)
    free = available if available is not None else available_memory(dev)
    need = int(size * IN_MEMORY_FACTOR)
    where = "GPU" if dev.type == "cuda" else "RAM"
    verdict = need > free
    return verdict, (f"in-memory pruning needs about {need / 1e9:.1f} GB ({IN_MEMORY_FACTOR:g}x the "
                     f"{size / 1e9:.1f} GB checkpoint), {where} has {free / 1e9:.1f} GB free")


# ------------------------------------------------------------------------------------------
# Prune and save, block by block
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SequentialPruneResult:
    """A sequential prune: every pass' own result; the weights are written by :func:`save_sequential`."""

    checkpoint: Checkpoint
    model: nn.Module  # the original skeleton (parameters on meta)
    graph: PrunableGraph
    analysis: Any
    cut: BlockCut
    run: SequentialScores
    plan: Any
    rewrite: Any  # the RewriteResult of the meta rewrite: pruned skeleton, shapes, attribute changes
    report: Any
    update: Any = None  # the WeightUpdate the save applies before slicing (obs, surgeon), or None

    @property
    def scores(self) -> Scores:
        assert self.run.scores is not None
        return self.run.scores


def prune_sequential(
    source: str | Checkpoint,
    ratio: float,
    *,
    calib: Any = None,
    tokenizer: Any = None,
    factory: Callable[[], nn.Module] | None = None,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    importance: str | None = None,
    aggregate: str = "sum",
    allocation: str | None = None,
    round_to: int | Mapping[str, int] | str = "auto",
    kinds: Mapping[str, Any] | None = None,
    max_group_ratio: float = 0.9,
    keep_blocks_first: int = 0,
    keep_blocks_last: int = 0,
    ignore: Sequence[str] = (),
    n_samples: int = 32,
    seq_len: int = 128,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    distributed: Any = None,
    ram_bytes: int | None = None,
    offload_dir: str | None = None,
    progress: bool = True,
    update_method: str = "auto",
    importance_options: Mapping[str, Any] | None = None,
) -> SequentialPruneResult:
    """``fxprune.prune`` for a checkpoint on disk, one block at a time (see the module docs).

    Traces and analyses the model on meta, scores it block by block, plans (rank 0 when
    ``distributed``, then broadcast), computes the curvature update block by block (obs,
    surgeon: one more sweep) and rewrites the skeleton on meta; write the pruned weights with
    :func:`save_sequential`.  Arguments are those of :func:`fxprune.prune`, with the same defaults
    (``importance``: surgeon for a model with a loss, obs without one, l2 without calibration
    data; ``allocation``: cost for the curvature criteria); it prunes in one shot.  Each
    criterion's update (surgeon, obs, flap) is applied as in memory.
    """
    from fxprune.api import _Clock, _report
    from fxprune.calib import load_calibration
    from fxprune.passes.analysis import analyze
    from fxprune.passes.capture import trace
    from fxprune.passes.plan import make_plan
    from fxprune.passes.rewrite import rewrite
    from fxprune.util.modules import numel_by_name

    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        from fxprune.errors import PlanError

        raise PlanError(f"ratio must be in [0, 1), got {ratio!r}")
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    timings: dict[str, float] = {}
    notes: list[str] = []
    clock = _Clock(timings)
    with clock("calibration"):
        batches = None
        if calib is not None:
            batches = load_calibration(calib, tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                       batch_size=batch_size)
    with clock("capture"):
        model = skeleton_from_checkpoint(checkpoint.directory, factory)
        inputs = dict(example_inputs) if example_inputs is not None else hf.default_example_inputs(_cpu_view(model))
        graph = trace(meta_twin(model), kwargs=inputs)
    with clock("analyze"):
        analysis = analyze(graph, ignore=ignore)
        cut = cut_blocks(graph)
    from fxprune.api import default_importance

    if importance is None:
        importance = default_importance(model, loss_fn, calib)
    crit = IMPORTANCE.get(importance)
    if crit is None:
        from fxprune.errors import PlanError

        raise PlanError(f"unknown importance criterion {importance!r}; choose from {sorted(IMPORTANCE)}")
    if allocation is None:
        allocation = "cost" if crit.costs else "uniform"
    if getattr(crit, "multi_shot", False) and batches is not None:
        notes.append(f"sequential mode prunes in one shot ({importance} in memory takes shots='auto')")
    if batches is None and (crit.needs_grad or crit.needs_inputs):
        batches = [dict(inputs)]
        notes.append(f"importance '{importance}' had no calibration data (calib=...); scored on example inputs only")
    if distributed is not None and batches is not None:
        batches = distributed.shard(batches)
    with clock("score"):
        run = score_sequential(model, checkpoint, analysis, batches, importance=importance, aggregate=aggregate,
                               cut=cut, device=device, dtype=dtype, loss_fn=loss_fn, seed=seed,
                               distributed=distributed, ram_bytes=ram_bytes, offload_dir=offload_dir,
                               progress=progress, importance_options=importance_options)
    with clock("plan"):
        from fxprune.api import device_round_to, drop_undescribable_kinds

        if round_to == "auto":  # as prune(): widths a multiple of the device's GEMM panel
            round_to = device_round_to(analysis, device)
        if allocation == "uniform":  # as prune(): kinds no standard config describes stay whole
            kinds = drop_undescribable_kinds(model, analysis, kinds, round_to, notes)
        plan = None
        if distributed is None or distributed.is_main:
            plan = make_plan(analysis, run.scores, float(ratio), numel=numel_by_name(model), allocation=allocation,
                             max_group_ratio=max_group_ratio, keep_blocks_first=keep_blocks_first,
                             keep_blocks_last=keep_blocks_last, ignore=ignore, round_to=round_to, kinds=kinds)
        if distributed is not None:
            plan = distributed.broadcast_plan(analysis, plan)
    if update_method == "auto":
        update_method = run.scores.update_method
    with clock("update"):
        weights = update_sequential(model, analysis, plan, run.scores, method=update_method, offload_dir=offload_dir,
                                    checkpoint=checkpoint, cut=cut, device=device, dtype=dtype, progress=progress)
        notes.extend(weights.notes)
    with clock("rewrite (meta)"):
        from fxprune.passes.update import IDENTITY

        # the rewrite needs only the shapes of what the update added (flap's new biases), not values
        shapes_only = dataclasses.replace(IDENTITY, method=weights.method, added={
            k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.added.items()})
        result = rewrite(model, analysis, plan, shapes_only if weights.added else None) if plan else None
        if result is not None and result.problems:
            result = _settle_conflicts_on_meta(model, analysis, plan, result, notes,
                                               shapes_only if weights.added else None)
    notes.append(f"sequential ({run.mode}): {cut.describe()}")
    pruned = result.model if result is not None else model
    report = _report(model, pruned, graph, analysis, plan, run.scores, float(ratio), importance, allocation,
                     timings, notes, result)
    from fxprune.api import _config_state

    report = dataclasses.replace(report, update=update_method, round_to=round_to,
                                 by_kind=dict(plan.info.get("by_kind", {})) if plan else {},
                                 config=_config_state(pruned, result))
    return SequentialPruneResult(checkpoint, model, graph, analysis, cut, run, plan, result, report,
                                 None if weights.is_identity else weights)


def _settle_conflicts_on_meta(model: nn.Module, analysis: Any, plan: Any, result: Any, notes: list[str],
                              weights: Any = None) -> Any:
    """Resolve the module rewrite's attribute conflicts without weights.

    In memory, ``rewrite`` tries attribute values until the module's outputs equal the rewritten
    graph's; without weights the judge is whether the pruned skeleton still traces on meta and
    gives the rewritten graph's output shapes (HF forwards do not run eagerly on meta, export does).
    """
    from fxprune.passes.compare import Verdict
    from fxprune.passes.rewrite import _resolve_conflicts, rewrite_module
    from fxprune.util.outputs import tensor_leaves

    graph = analysis.graph
    kwargs = {**{k: v.to("meta") for k, v in graph.example_kwargs.items()}, **graph.constant_kwargs}
    with torch.no_grad():
        want = [tuple(t.shape) for t in tensor_leaves(result.program(**{k: kwargs[k] for k in graph.example_kwargs}))]

    def judge(module: nn.Module) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(meta_twin(module), (), kwargs, strict=False)
                got = [tuple(t.shape) for t in tensor_leaves(ep.module()(**kwargs))]
        except Exception:  # noqa: BLE001 - a failing trace is a rejected candidate
            return False
        return got == want

    def shape_verdict(module: nn.Module) -> Verdict:
        ok = judge(module)
        return Verdict(ok, 0.0 if ok else math.inf, 0.0 if ok else math.inf, "output shapes on meta", (),
                       "" if ok else "the output shapes differ from the rewritten graph's on meta")

    mod = rewrite_module(model, analysis, plan, result.program, weights)
    if not mod.conflicts or not _resolve_conflicts(mod, shape_verdict):
        raise AnalysisError("the pruned skeleton cannot be made consistent with the rewritten graph: "
                            + "; ".join(result.problems))
    notes.append("attribute conflicts settled on meta by shapes: "
                 + ", ".join(f"{m}.{a}={v[1]}" for m, attrs in mod.attribute_changes.items() for a, v in attrs.items()
                             if any(a in p for p in result.problems))[:300])
    return dataclasses.replace(result, model=mod.module, attribute_changes={k: dict(v) for k, v in mod.attribute_changes.items()},
                               problems=(), shapes={n: list(t.shape) for n, t in mod.module.state_dict().items()})


def _cpu_view(model: nn.Module) -> nn.Module:
    """An object whose example inputs come out on the CPU (``default_example_inputs`` follows the
    model's device, and the skeleton's is meta)."""

    class _View(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = getattr(model, "config", None)
            self.forward = model.forward

    return _View()


def save_sequential(result: SequentialPruneResult, directory: str, *, overwrite: bool = False,
                    protect: Iterable[str] = (), max_shard_bytes: int = 5 * 10**9, progress: bool = True,
                    extra: dict | None = None, tokenizer: Any = None) -> str:
    """Write the pruned model of a sequential prune to ``directory``, block by block (atomically):
    the same checkpoint directory as :func:`fxprune.save` (config or per-layer config with
    ``modeling_fxprune.py``, tokenizer and other files of the source, model card)."""
    from fxprune.util.publish import publish_dir

    protect = [result.checkpoint.directory, *protect]
    with publish_dir(directory, overwrite=overwrite, protect=protect) as tmp:
        write_sequential_checkpoint(result, str(tmp), max_shard_bytes=max_shard_bytes, progress=progress,
                                    extra=extra, tokenizer=tokenizer)
    return os.path.abspath(directory)


def write_sequential_checkpoint(result: SequentialPruneResult, tmp: str, *, max_shard_bytes: int = 5 * 10**9,
                                progress: bool = True, extra: dict | None = None, tokenizer: Any = None) -> Any:
    """:func:`fxprune.checkpoint.write_checkpoint` with the weights streamed by
    :func:`save_sequential_into`; returns its :class:`~fxprune.checkpoint.Checkpoint`."""
    from fxprune.checkpoint import write_checkpoint

    def weights(model_dir: str, info: dict) -> Any:
        return save_sequential_into(result, model_dir, max_shard_bytes=max_shard_bytes, progress=progress,
                                    extra={**info, **(extra or {})})

    try:
        return write_checkpoint(result, tmp, source=result.checkpoint.directory, tokenizer=tokenizer,
                                save_weights=weights)
    finally:
        for spilled in ((result.update.changed, result.update.added) if result.update is not None else ()):
            if hasattr(spilled, "close"):
                spilled.close()  # the spilled compensated weights are written: delete them


def save_sequential_into(result: SequentialPruneResult, tmp: str, *, max_shard_bytes: int = 5 * 10**9,
                         progress: bool = True, extra: dict | None = None) -> Any:
    """Read each block of the source checkpoint, apply the sequential update to it (obs, surgeon),
    slice it to the plan and write it into ``tmp``'s shards; peak memory is one block.  Tensors keep
    the checkpoint's dtype (``dtype=`` of the prune is the compute dtype only).  Also writes
    ``fxprune.json``/``config.json`` (``fxprune.load``); returns :class:`fxprune.io.SavedModel`."""
    from fxprune.passes.rewrite import _slice_tensor, added_dims, new_tensor_shapes, norm_rescales, rescale_norm_weight

    ckpt, cut, graph = result.checkpoint, result.cut, result.graph
    pruned = result.rewrite.model if result.rewrite is not None else result.model
    dims_of = new_tensor_shapes(result.analysis, result.plan.removed_by_class) if result.plan else {}
    rescale = {graph.canonical(r.weight): r for r in norm_rescales(result.analysis, result.plan.removed_by_class)} \
        if result.plan else {}
    state_names = list(pruned.state_dict().keys())
    written: dict[str, str] = {}  # canonical -> the name it is written under
    tied: dict[str, str] = {}
    per_piece: dict[str, list[tuple[str, str]]] = {p: [] for p in cut.pieces}  # (written name, canonical)
    loader = _Loader(result.model, ckpt, _aliases(result.model), torch.device("cpu"), None)
    for name in state_names:
        canonical = graph.canonical(name)
        if canonical in written:
            tied[name] = written[canonical]
            continue
        written[canonical] = name
        per_piece[cut.piece_of(canonical) if any(canonical in v for v in cut.tensors.values()) else POST].append(
            (name, canonical))
    shapes = pruned.state_dict()
    changed = result.update.changed if result.update is not None else {}
    added = result.update.added if result.update is not None else {}
    dims_of = {**dims_of, **{f: d for f in added if (d := added_dims(f, dims_of))}}
    entries: list[tuple[str, Sequence[int], torch.dtype]] = []
    sources: dict[str, str | None] = {}
    dtypes: dict[str, torch.dtype] = {}
    for piece in cut.pieces:
        for name, canonical in per_piece[piece]:
            src = None if name in added else loader.source(canonical)
            sources[name] = src
            if name in added:  # stored like the weight beside it
                beside = loader.source(graph.canonical(name.rpartition(".")[0] + ".weight"))
                dtype = ckpt.dtypes[beside] if beside is not None else shapes[name].dtype
            else:
                dtype = ckpt.dtypes[src] if src is not None else shapes[name].dtype
            dtypes[name] = dtype
            entries.append((name, tuple(shapes[name].shape), dtype))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        bar = _bar(len(cut.pieces), "writing", progress)
        try:
            for piece in cut.pieces:
                items = per_piece[piece]
                names = [sources[n] for n, _ in items if sources[n] is not None]
                values = ckpt.read(names, "cpu") if names else {}
                for name, canonical in items:
                    src = sources[name]
                    if name in added:  # a tensor the update added (flap's bias), sliced like its weight
                        value = added[name].to(dtypes[name])
                    elif src is None:  # a buffer the constructor computed: take the skeleton's own
                        value = result.model.get_buffer(canonical)
                    else:
                        value = values.pop(src)
                    new = next((changed[k] for k in (canonical, name) if k in changed), None)
                    if new is not None:  # the sequential update's compensated weights
                        value = new.to(value.dtype)
                    dims = dims_of.get(canonical, dims_of.get(name, {}))
                    value = _slice_tensor(value, dims) if dims else value
                    yield name, (rescale_norm_weight(value, rescale[canonical]) if canonical in rescale else value)
                del values
                bar.update(1)
        finally:
            bar.close()

    info = dict(extra or {})
    info.setdefault("sequential", {"blocks": len(cut.blocks), "mode": result.run.mode})
    if result.plan is not None:
        info.setdefault("plan", result.plan.as_dict())
    return save_streamed_into(pruned, result.rewrite, tmp, tensors(), entries, tied=tied,
                              max_shard_bytes=max_shard_bytes, extra=info)
