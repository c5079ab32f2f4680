"""Data parallelism over ``torch.distributed``: every rank scores its own shard of the calibration data.

    torchrun --nproc-per-node N -m fxprune prune DIR --ratio 0.2 --calib data.txt [--sequential]

What crosses the ranks, and why only that.  Every data-dependent quantity fxprune gathers is a
*sum* with a count (see :mod:`fxprune.passes.stats`), so a rank can gather its shard's sums alone
and the ranks add them up before anyone divides, takes an ``abs`` or normalises:

* scoring (:func:`reduce_scoring`, handed to :func:`fxprune.score` as ``sync=``, and called once
  per block by sequential mode): the criterion's per-index accumulators (Taylor's ``Σ_b w·g_b``
  reduced per dim, ...), the input moments of the hooked layers, and the batch/token counts, in
  one flat float64 ``all_reduce`` per scoring pass (per block in sequential mode);
* statistics (``Stats.all_reduce``): moments, ``H``/K-FAC ``A`` (``Σ x xᵀ``) and ``G`` (``Σ g gᵀ``);
* the plan: rank 0 plans, ``broadcast_object_list`` sends ``{group: units}`` and the planner's
  info, every rank rebuilds the same :class:`~fxprune.passes.plan.Plan` and applies it;
* writing: rank 0 writes, the others wait at a barrier.

No activation, weight or gradient tensor ever crosses ranks: each rank runs the whole model (or,
in sequential mode, each block) on its own batches.

Backends: gloo on CPU; NCCL when CUDA is visible, each rank on ``cuda:LOCAL_RANK`` (set by
torchrun).  Reductions go through a tensor on the backend's device (CUDA for NCCL).

Model placement:

* accelerate's ``device_map="auto"`` (weights on several GPUs, or GPU + CPU with every weight
  materialised): scoring runs the model where it is (accelerate's hooks move activations); the
  per-rank sums live on the first parameter's device and are reduced like any other.  Weights
  *offloaded* to disk/CPU by accelerate are meta tensors outside their forward, which no
  criterion can read; prune such a model with sequential mode instead, which onloads each block
  from the checkpoint itself.
* FSDP2 (``fully_shard``): statistics gathered by **module hooks** -- input moments, ``H``/``A``
  and ``G`` from the inputs and output gradients of each layer (:class:`~fxprune.passes.stats.Collector`,
  the ``activation``/``flap`` criteria) -- work unchanged: inside a module's forward FSDP2 has
  unsharded its parameters, and activations and output gradients are per-rank, per-token
  tensors.  **Post-accumulate-grad hooks do not**: under FSDP2 they see the *sharded* gradient
  (a ``DTensor`` shard) *after* the reduce-scatter has averaged it over the ranks, so a per-rank
  Taylor sum would be both partial and already reduced.  Gradient criteria (``taylor*``) are
  therefore refused on FSDP2-sharded parameters (:func:`check_gradient_hooks`); they would need a
  module-hook path (weight gradients rebuilt from each layer's input and output gradient).
  Criteria also read the weights when they turn sums into scores: :func:`reduce_scoring` gathers
  each sharded weight (``DTensor.full_tensor``) for that step, so scoring an FSDP2 model needs the
  memory of the full weights once (statistics alone do not).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch

from fxprune.errors import BadInputError, ScoringError

__all__ = [
    "DistContext", "ScoringSync", "init_distributed", "check_gradient_hooks", "reduce_scoring", "broadcast_plan",
    "all_reduce_flat", "shard",
]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process' place in a ``torch.distributed`` job, and the operations fxprune needs from it."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device  # where this rank computes (and where NCCL reductions live)
    group: Any = None
    owns_group: bool = False  # fxprune initialised the process group (and destroys it in close())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shard(self, batches: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of ``batches`` (sizes differ by at most one)."""
        return shard(batches, self.rank, self.world_size)

    @property
    def reduce_scoring(self) -> "ScoringSync":
        """``score(..., sync=ctx.reduce_scoring)``: checks before the passes, sums after them."""
        return ScoringSync(self)

    def reduce_stats(self, stats: Any) -> Any:
        return stats.all_reduce(self.group, self.comm_device if self.backend == "nccl" else None)

    def broadcast_plan(self, analysis: Any, plan: Any) -> Any:
        return broadcast_plan(analysis, plan, self)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[self.device.index or 0])
        else:
            dist.barrier(group=self.group)

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class ScoringSync:
    """The ``sync=`` of :func:`fxprune.score` for one job (see :func:`reduce_scoring`)."""

    dist: DistContext

    def prepare(self, crit: Any, ctx: Any) -> None:
        check_gradient_hooks(crit, ctx)
        if hasattr(crit, "reduce_stats"):  # curvature criteria gather Stats themselves: sum each gathering
            crit.reduce_stats = self.dist.reduce_stats

    def __call__(self, crit: Any, ctx: Any, tokens: int) -> int:
        return reduce_scoring(crit, ctx, tokens, self.dist)


def shard(batches: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Contiguous shard ``rank`` of ``world_size`` (the first ``len % world`` shards get one more)."""
    items = list(batches)
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (1 if rank < extra else 0)]


def init_distributed(backend: str = "auto") -> DistContext | None:
    """Join the job torchrun describes (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` env), or None alone.

    ``backend="auto"``: NCCL when CUDA is available (this rank then computes on
    ``cuda:LOCAL_RANK``), gloo otherwise.  An already initialised process group is used as is.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return None
    already = dist.is_initialized()
    world = dist.get_world_size() if already else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if already:
        chosen = dist.get_backend()
    elif backend == "auto":
        chosen = "nccl" if torch.cuda.is_available() else "gloo"
    else:
        chosen = backend
    if chosen not in ("gloo", "nccl"):
        raise BadInputError(f"distributed backend must be gloo or nccl, got {chosen!r}")
    if chosen == "nccl":
        if not torch.cuda.is_available():
            raise BadInputError("the NCCL backend needs CUDA; use gloo on CPU")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not already:
        kwargs = {"device_id": device} if chosen == "nccl" else {}
        dist.init_process_group(chosen, **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, device, None, not already)


# ------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------
def all_reduce_flat(tensors: Sequence[torch.Tensor], ctx: DistContext) -> list[torch.Tensor]:
    """Sum ``tensors`` over the ranks in one ``all_reduce`` (float64); each comes back in its own
    dtype and device.  Every rank must pass tensors of the same shapes in the same order."""
    import torch.distributed as dist

    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).to(ctx.comm_device, torch.float64) for t in tensors])
    dist.all_reduce(flat, group=ctx.group)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset:offset + n].view(t.shape).to(t.device, t.dtype))
        offset += n
    return out


def _gather_union(entries: dict[tuple, torch.Tensor], ctx: DistContext) -> list[tuple[tuple, tuple[int, ...], str]]:
    """Every (key, shape, dtype) any rank holds, sorted: a rank without data adds zeros for it."""
    import torch.distributed as dist

    mine = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in entries.items()]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine, group=ctx.group)
    union: dict[tuple, tuple[tuple[int, ...], str]] = {}
    for rank_entries in gathered:
        for key, shape, dtype in rank_entries:
            if key in union and union[key][0] != shape:
                raise ScoringError(f"ranks disagree on the shape of {key}: {union[key][0]} vs {shape}")
            union[key] = (shape, dtype)
    return [(k, *union[k]) for k in sorted(union, key=repr)]


def reduce_scoring(crit: Any, ctx: Any, tokens: int, dist_ctx: DistContext) -> int:
    """Sum a scoring pass' data-dependent state over the ranks, in place; returns the global tokens.

    The state is what :mod:`fxprune.passes.scoring` accumulates: the criterion's per-index sums
    (``Importance._acc``, keyed here by parameter name so every rank agrees), the input moments
    in ``ctx.input_stats`` and ``ctx.n_batches``.  A criterion keeping other sums provides
    ``all_reduce(dist_ctx)`` and is called too.  Ranks that saw no batch contribute zeros.
    """
    from fxprune.passes.scoring import InputStats

    check_gradient_hooks(crit, ctx)
    name_of = {id(t.param): t.name for t in ctx.targets.values()}
    param_of = {t.name: t.param for t in ctx.targets.values()}
    module_of: dict[str, torch.nn.Module] = {}
    for t in ctx.targets.values():
        if t.module is not None:
            module_of.setdefault(t.name.rpartition(".")[0], t.module)
    module_name = {id(m): n for n, m in module_of.items()}

    entries: dict[tuple, torch.Tensor] = {}
    for (pid, dim, slot), value in crit._acc.items():
        entries[("acc", name_of[pid], dim, slot)] = value
    counts: dict[str, int] = {}
    for mid, st in ctx.input_stats.items():
        name = module_name[mid]
        entries[("in", name, "total")] = st.total
        entries[("in", name, "total_sq")] = st.total_sq
        counts[name] = st.count
    union = _gather_union(entries, dist_ctx)
    device = next((v.device for v in entries.values()), torch.device("cpu"))
    values = [entries.get(k, torch.zeros(shape, dtype=getattr(torch, dtype), device=device)) for k, shape, dtype in union]
    in_names = sorted({k[1] for k, _, _ in union if k[0] == "in"})
    scalars = torch.tensor([float(counts.get(n, 0)) for n in in_names] + [float(ctx.n_batches), float(tokens)],
                           dtype=torch.float64)
    *reduced, scalars = all_reduce_flat([*values, scalars], dist_ctx)

    crit._acc.clear()
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for (key, _, _), value in zip(union, reduced, strict=True):
        if key[0] == "acc":
            crit._acc[(id(param_of[key[1]]), key[2], key[3])] = value
        else:
            moments.setdefault(key[1], {})[key[2]] = value
    ctx.input_stats.clear()
    for i, name in enumerate(in_names):
        ctx.input_stats[id(module_of[name])] = InputStats(moments[name]["total"], moments[name]["total_sq"],
                                                          int(scalars[i]))
    ctx.n_batches = int(scalars[-2])
    for t in ctx.targets.values():  # criteria read the weights: FSDP2 shards are gathered for scoring
        if _is_dtensor(t.param):
            t.param = t.param.full_tensor()
    extra = getattr(crit, "all_reduce", None)
    if callable(extra):
        extra(dist_ctx)
    return int(scalars[-1])


def check_gradient_hooks(crit: Any, ctx: Any) -> None:
    """Refuse gradient criteria on FSDP2-sharded parameters (see the module docs: their
    post-accumulate-grad hooks see sharded, already-averaged ``DTensor`` gradients)."""
    if not getattr(crit, "needs_grad", False):
        return
    sharded = [t.name for t in ctx.targets.values() if _is_dtensor(t.param)]
    if sharded:
        raise ScoringError(
            f"importance {crit.name!r} reads parameter gradients, but {sharded[0]} (and {len(sharded) - 1} more) "
            "are FSDP2-sharded: their post-accumulate-grad hooks see a sharded gradient already averaged over "
            "the ranks. Score FSDP2 models with module-hook criteria (activation, flap, or Stats-based ones), "
            "or run taylor data-parallel on unsharded replicas (torchrun without fully_shard)."
        )


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def broadcast_plan(analysis: Any, plan: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s plan on every rank (``plan`` is ignored elsewhere and may be None)."""
    import torch.distributed as dist

    from fxprune.passes.plan import Plan

    payload: list[Any] = [(plan.as_dict(), dict(plan.info)) if ctx.rank == src else None]
    dist.broadcast_object_list(payload, src=src, group=ctx.group,
                               device=ctx.device if ctx.backend == "nccl" else None)
    if ctx.rank == src:
        return plan
    units, info = payload[0]
    return Plan.of(analysis, units, info)

