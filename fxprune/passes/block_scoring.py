"""Depth criteria: how much does each residual branch (unit of the blocks group) matter?

    (nn.Module, Analysis, batches) --score_blocks--> Scores {"blocks": one score per branch}

A parallel registry to the width criteria (:data:`fxprune.passes.scoring.IMPORTANCE`): a
branch is removed whole, so its score is a property of the branch (how much it changes the
stream, what removing it costs), not a sum over tensor slices.  Higher means keep.

* ``shortgpt``: ShortGPT's block influence, the mean over tokens of ``1 - cos(x, x + f(x))``
  between the stream entering and leaving the branch (Men et al., 2024).
* ``sleb``: SLEB, greedy and iterative (Song et al., 2024): remove the branch whose removal
  hurts the calibration loss least, re-measure with it removed, repeat.  The score is the
  removal order, so the planner's "lowest scores first" is the greedy sequence.
* ``ppl``: one-shot version of the same measure (Shortened LLaMA's PPL criterion): the
  calibration loss with each branch removed alone.
* ``taylor+``: Shortened LLaMA's Taylor criterion per block, ``sum |w * dL/dw|`` over the
  branch's own parameters (use ``keep_blocks_first``/``keep_blocks_last`` in the planner for
  the paper's "+" heuristic of sparing the first and last blocks).
* ``curvature``: the loss increase a curvature model predicts for removing each branch,
  supplied by a cost function registered in :data:`BLOCK_COSTS` (the extension point for
  second-order statistics; see :func:`register_block_cost`).
* ``random``: a seeded baseline.

Removing a branch is evaluated on the exported graph itself: each residual add gets a gate,
``x + gate * f(x)``, so "the model without branches R" is one program whose gates are set to 0
on R; this is exactly what the rewrite's bypass computes.  The calibration loss is the causal
LM loss when the output has logits for ``input_ids``, ``loss_fn(output, batch)`` when given,
else the mean squared distance to the dense model's output.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from fxprune.errors import BadInputError, DataError, ScoringError
from fxprune.passes.base import check, class_registrar, fxpass
from fxprune.passes.scoring import NORMALIZERS, Scores, _lookup
from fxprune.util.modules import eval_mode, model_device, resolve_device, to_device
from fxprune.util.loss import model_loss
from fxprune.util.outputs import tensor_leaves

__all__ = ["BLOCK_IMPORTANCE", "BLOCK_COSTS", "BlockImportance", "register_block_importance",
           "register_block_cost", "score_blocks", "GatedProgram"]

BLOCK_IMPORTANCE: dict[str, type["BlockImportance"]] = {}
"""Depth criteria by name.  Add one with :func:`register_block_importance`."""

BlockCost = Callable[..., np.ndarray]
BLOCK_COSTS: dict[str, BlockCost] = {}
"""Cost models for ``importance="curvature"``: ``fn(model, analysis, group, batches, **options)``
returns the predicted loss increase of removing each branch of ``group`` (one float per unit)."""


register_block_importance = class_registrar(BLOCK_IMPORTANCE, lambda: BlockImportance, "register_block_importance")
"""Class decorator: make a :class:`BlockImportance` available as ``score_blocks(importance=name)``."""


def register_block_cost(name: str) -> Callable[[BlockCost], BlockCost]:
    """Function decorator: a curvature cost model for ``score_blocks(importance="curvature", cost=name)``."""

    def deco(fn: BlockCost) -> BlockCost:
        BLOCK_COSTS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------------
# The exported graph with one gate per residual add
# ------------------------------------------------------------------------------------------
class _Recorder(torch.nn.Module):
    """Hands the stream before and after branch ``i`` to the program's watchers."""

    def __init__(self, i: int, watchers: list) -> None:
        super().__init__()
        self.i, self.watchers = i, watchers

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for w in self.watchers:
            w(self.i, x, out)
        return out


class GatedProgram:
    """The analysed program with ``x + gate[i] * f_i(x)`` at every branch ``i`` of ``branches``.

    ``set_removed(units)`` sets the gates (0 for removed, 1 otherwise); ``watch(fn)`` calls
    ``fn(i, x, out)`` with the stream entering and leaving each branch on every run.  The
    program shares its weights with the model it was traced from.
    """

    def __init__(self, analysis: Any, branches: Sequence[Any]) -> None:
        self.graph = analysis.graph
        gm = self.graph.exported_program.module()
        nodes = {n.name: n for n in gm.graph.nodes}
        self.gates = torch.ones(len(branches))
        self._watchers: list[Callable[[int, torch.Tensor, torch.Tensor], None]] = []
        for i, br in enumerate(branches):
            add, x = nodes[br.add], nodes[br.stream]
            gm.register_buffer(f"_fxprune_gate_{i}", torch.ones((), dtype=x.meta["val"].dtype), persistent=False)
            for term in br.terms or (br.output,):  # x + gate * attn + gate * mlp for a parallel block
                y = nodes[term]
                consumer = add if add in y.users else next(
                    u for u in y.users if u.name in br.nodes and u.target is torch.ops.aten.add.Tensor)
                with gm.graph.inserting_before(consumer):
                    gate = gm.graph.get_attr(f"_fxprune_gate_{i}")
                    scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (y, gate))
                consumer.replace_input_with(y, scaled)
            gm.add_submodule(f"_fxprune_record_{i}", _Recorder(i, self._watchers))
            with gm.graph.inserting_after(add):
                rec = gm.graph.call_module(f"_fxprune_record_{i}", (x, add))
            for u in list(add.users):
                if u is not rec:
                    u.replace_input_with(add, rec)
        gm.recompile()
        self.gm = gm
        self.n = len(branches)

    def set_removed(self, units: Iterable[int]) -> None:
        gone = set(units)
        for i in range(self.n):
            getattr(self.gm, f"_fxprune_gate_{i}").fill_(0.0 if i in gone else 1.0)

    @contextlib.contextmanager
    def watch(self, fn: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        self._watchers.append(fn)
        try:
            yield
        finally:
            self._watchers.remove(fn)

    def __call__(self, batch: Any) -> Any:
        args, kwargs = _graph_inputs(self.graph, batch)
        return self.gm(*args, **kwargs)


def _graph_inputs(graph: Any, batch: Any) -> tuple[tuple, dict]:
    """A calibration batch as the traced program's arguments (extra keys such as labels dropped)."""
    if isinstance(batch, Mapping):
        names = set(graph.example_kwargs)
        kwargs = {k: v for k, v in batch.items() if k in names}
        missing = names - set(kwargs)
        if missing:
            raise DataError(f"calibration batch lacks {sorted(missing)}, which the traced program takes")
        return (), {**kwargs, **graph.constant_kwargs}
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    return tuple(batch), dict(graph.constant_kwargs)


def _calib_loss(out: Any, batch: Any, loss_fn: Any, reference: Any) -> float:
    """Causal LM loss when possible, else ``loss_fn``, else the distance to ``reference``."""
    if loss_fn is not None:
        return float(loss_fn(out, batch))
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if isinstance(logits, torch.Tensor) and isinstance(ids, torch.Tensor) and logits.dim() == 3 \
            and logits.shape[:2] == ids.shape and ids.shape[1] > 1:
        target = ids[:, 1:]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            target = target.masked_fill(mask[:, 1:] == 0, -100)
        return float(torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100))
    leaves, refs = tensor_leaves(out, floating=True), tensor_leaves(reference, floating=True)
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(leaves, refs, strict=False))
    den = sum(float(b.float().pow(2).sum()) for b in refs) or 1.0
    return num / den


# ------------------------------------------------------------------------------------------
# Criteria
# ------------------------------------------------------------------------------------------
class BlockImportance:
    """Base class of depth criteria: :meth:`scores` returns one float per branch (higher = keep)."""

    name: ClassVar[str] = "?"
    needs_data: ClassVar[bool] = True

    def __init__(self, seed: int = 0, **options: Any) -> None:
        self.seed = seed
        self.options = options

    def scores(self, ctx: "BlockContext") -> np.ndarray:
        raise NotImplementedError


class BlockContext:
    """What a depth criterion sees: the model, the analysis, the group, batches, device, loss."""

    def __init__(self, model: Any, analysis: Any, group: Any, batches: Sequence[Any], device: torch.device,
                 loss_fn: Any, progress: bool) -> None:
        self.model, self.analysis, self.group = model, analysis, group
        self.batches, self.device, self.loss_fn, self.progress = batches, device, loss_fn, progress
        self._program: GatedProgram | None = None
        self._reference: list[Any] | None = None

    @property
    def program(self) -> GatedProgram:
        if self._program is None:
            self._program = GatedProgram(self.analysis, self.group.branches)
            self._program.gm.to(self.device)
        return self._program

    def bar(self, it: Iterable[Any], desc: str, total: int | None = None) -> Any:
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, total=total, disable=not self.progress, leave=False)

    def loss_without(self, removed: Iterable[int]) -> float:
        """Mean calibration loss of the program with the branches ``removed`` bypassed."""
        prog = self.program
        if self._reference is None:
            prog.set_removed(())
            with torch.no_grad():
                self._reference = [None if self.loss_fn is not None else prog(to_device(b, self.device))
                                   for b in self.batches]
        prog.set_removed(removed)
        total = 0.0
        with torch.no_grad():
            for b, ref in zip(self.batches, self._reference, strict=True):
                b = to_device(b, self.device)
                total += _calib_loss(prog(b), b, self.loss_fn, ref)
        prog.set_removed(())
        return total / max(len(self.batches), 1)


@register_block_importance("shortgpt")
class ShortGPT(BlockImportance):
    """Block influence ``1 - cos(x, x + f(x))``, averaged over tokens (over samples for maps)."""

    def scores(self, ctx: BlockContext) -> np.ndarray:
        n = ctx.group.size
        total, count = np.zeros(n), np.zeros(n)

        def watch(i: int, x: torch.Tensor, out: torch.Tensor) -> None:
            a, b = _features(x), _features(out)
            cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)
            total[i] += float((1.0 - cos).sum())
            count[i] += cos.numel()

        prog = ctx.program
        prog.set_removed(())
        with torch.no_grad(), prog.watch(watch):
            for b in ctx.bar(ctx.batches, "scoring blocks (shortgpt)"):
                prog(to_device(b, ctx.device))
        return total / np.maximum(count, 1)


def _features(t: torch.Tensor) -> torch.Tensor:
    """Rows to compare: tokens (``[..., hidden]``) or whole samples for rank-4+ feature maps."""
    return t.reshape(-1, t.shape[-1]) if t.dim() <= 3 else t.reshape(t.shape[0], -1)


@register_block_importance("ppl")
class OneShotLoss(BlockImportance):
    """Calibration loss with each branch removed alone (higher = removing it hurts more)."""

    def scores(self, ctx: BlockContext) -> np.ndarray:
        return np.array([ctx.loss_without([u]) for u in ctx.bar(range(ctx.group.size), "scoring blocks (ppl)")])


@register_block_importance("sleb")
class SLEB(BlockImportance):
    """Greedy iterative removal: at each step remove the branch whose removal (with the ones
    already removed) gives the lowest calibration loss.  ``steps`` bounds the number of steps
    (default: all but one branch); the score is the step at which a branch went, and branches
    never removed rank after them by their last measured loss.

    ``per_param=True`` ranks candidates by the loss increase per parameter they remove instead
    (the knapsack heuristic: with branches of different sizes, attention and MLP, the greedy
    prefix then reaches a parameter budget at a lower loss)."""

    def scores(self, ctx: BlockContext) -> np.ndarray:
        n = ctx.group.size
        steps = min(int(self.options.get("steps", n - 1)), n - 1)
        per_param = bool(self.options.get("per_param", False))
        numel = {k: v.numel() for k, v in ctx.model.named_parameters(remove_duplicate=False)}
        size = [max(sum(numel.get(p, 0) for p in b.params), 1) for b in ctx.group.branches]
        base = ctx.loss_without(()) if per_param else 0.0
        removed: list[int] = []
        last = np.zeros(n)
        scores = np.zeros(n)
        with ctx.bar(None, "scoring blocks (sleb)", total=sum(n - k for k in range(steps))) as bar:
            for step in range(steps):
                trial = {}
                for u in range(n):
                    if u in removed:
                        continue
                    trial[u] = ctx.loss_without(removed + [u])
                    last[u] = trial[u]
                    bar.update(1)
                current = ctx.loss_without(removed) if per_param and removed else base
                if per_param:  # loss increase per parameter removed
                    best = min(trial, key=lambda u, t=trial, c=current: ((t[u] - c) / size[u], u))
                else:
                    best = min(trial, key=lambda u, t=trial: (t[u], u))
                removed.append(best)
                scores[best] = step
        rest = [u for u in range(n) if u not in removed]
        for rank, u in enumerate(sorted(rest, key=lambda u: (last[u], u))):
            scores[u] = steps + rank
        return scores + 1.0


@register_block_importance("taylor+")
class BlockTaylor(BlockImportance):
    """``sum |w * dL/dw|`` over each branch's own parameters (first-order loss change of removal)."""

    def scores(self, ctx: BlockContext) -> np.ndarray:
        model = ctx.model
        named = dict(model.named_parameters(remove_duplicate=False))
        owner: dict[int, list[int]] = {}
        for u, br in enumerate(ctx.group.branches):
            for p in br.params:
                if p in named:
                    owner.setdefault(id(named[p]), []).append(u)
        acc = np.zeros(ctx.group.size)
        params = {id(p): p for p in model.parameters()}
        flags = {k: p.requires_grad for k, p in params.items()}
        grads = {k: p.grad for k, p in params.items()}
        handles = []

        def hook_for(units: list[int]) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                g, p.grad = p.grad, None
                if g is not None:
                    value = float((g * p.detach()).abs().sum())
                    for u in units:
                        acc[u] += value
            return hook

        try:
            for k, p in params.items():
                p.grad = None
                p.requires_grad_(k in owner)
                if k in owner:
                    handles.append(p.register_post_accumulate_grad_hook(hook_for(owner[k])))
            for b in ctx.bar(ctx.batches, "scoring blocks (taylor+)"):
                loss = model_loss(model, to_device(b, ctx.device), ctx.loss_fn)
                if not loss.requires_grad:
                    raise ScoringError("the loss does not depend on any branch parameter")
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            for k, p in params.items():
                p.requires_grad_(flags[k])
                p.grad = grads[k]
        return acc / max(len(ctx.batches), 1)


@register_block_importance("curvature")
class CurvatureCost(BlockImportance):
    """The loss increase a registered cost model (:data:`BLOCK_COSTS`) predicts per branch.

    ``cost=NAME`` picks the model (default: the only one registered, ``surgeon`` unless you
    register another).  Cost models receive ``loss_fn``, ``device`` and ``progress`` as options.
    """

    def scores(self, ctx: BlockContext) -> np.ndarray:
        name = self.options.get("cost")
        if name is None:
            if len(BLOCK_COSTS) != 1:
                raise ScoringError(
                    "importance 'curvature' needs a cost model: register one with "
                    f"fxprune.passes.block_scoring.register_block_cost (registered: {sorted(BLOCK_COSTS)}) "
                    "and pass cost=NAME")
            name = next(iter(BLOCK_COSTS))
        fn = _lookup(BLOCK_COSTS, name, "block cost model")
        extra = {"loss_fn": ctx.loss_fn, "device": ctx.device, "progress": ctx.progress,
                 **{k: v for k, v in self.options.items() if k != "cost"}}
        out = np.asarray(fn(ctx.model, ctx.analysis, ctx.group, ctx.batches, **extra), dtype=np.float64)
        if out.shape != (ctx.group.size,):
            raise ScoringError(f"cost model {name!r} returned shape {out.shape}, expected ({ctx.group.size},)")
        return out


def output_projection(model: Any, analysis: Any, branch: Any, nodes: Mapping[str, Any] | None = None) -> str | None:
    """The module of the last linear-like layer on the branch's path (graph order), or None.
    ``nodes``: the graph's ``{name: node}`` (built here when not given)."""
    from fxprune.util.hf import linear_input_dim

    graph = analysis.graph
    if nodes is None:
        nodes = {n.name: n for n in graph.exported_program.graph.nodes}
    own = set(branch.params)
    for name in reversed(branch.nodes):
        node = nodes.get(name)
        if node is None or node.op != "call_function":
            continue
        for arg in node.all_input_nodes:
            fqn = graph.param_of.get(arg.name)
            if fqn is None or graph.canonical(fqn) not in own and fqn not in own:
                continue
            mod_name, _, attr = fqn.rpartition(".")
            if attr == "weight" and linear_input_dim(model.get_submodule(mod_name)) is not None:
                return mod_name
    return None


@register_block_cost("surgeon")
def surgeon_block_cost(model: Any, analysis: Any, group: Any, batches: Sequence[Any], *, loss_fn: Any = None,
                       device: Any = "cpu", progress: bool = False, **_: Any) -> np.ndarray:
    """The LLM Surgeon's K-FAC estimate of the loss increase of removing each branch.

    Removing a branch removes its output; its last linear-like layer (the output projection)
    zeroed is the weight change ``ΔW = -W`` (bias included) that does so.  Under the
    Kronecker-factored Fisher ``F ≈ A ⊗ G`` (``A = E[x xᵀ]`` with a bias column, ``G = E[g gᵀ]`` of
    its output gradients) the predicted loss increase is ``½ tr(G W A Wᵀ)``.
    """
    from fxprune.passes.stats import StatSpec, gather_stats
    from fxprune.util.hf import linear_input_dim

    proj: dict[int, str] = {}
    nodes = {n.name: n for n in analysis.graph.exported_program.graph.nodes}
    for unit, b in enumerate(group.branches):
        name = output_projection(model, analysis, b, nodes)
        if name is None:
            raise ScoringError(f"the surgeon block cost needs a linear-like output projection; branch {b.id} "
                               "has none: use another block criterion")
        proj[unit] = name
    stats = gather_stats(model, batches, StatSpec(input_cov=True, grad_cov=True, bias_column=True),
                         layers=sorted(set(proj.values())), loss_fn=loss_fn, device=device, progress=progress)
    out = np.zeros(group.size)
    for unit, mod_name in proj.items():
        mod, ls = model.get_submodule(mod_name), stats[mod_name]
        w = mod.weight.detach().double().cpu()
        w = w.T if linear_input_dim(mod) == 0 else w.reshape(w.shape[0], -1)  # (out, in)
        if ls.bias_column:
            bias = getattr(mod, "bias", None)
            col = bias.detach().double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            w = torch.cat([w, col[:, None]], dim=1)
        a, g = ls.A.double(), ls.G.double()
        out[unit] = 0.5 * float(((g @ w) * (w @ a)).sum())
    return out


@register_block_importance("random")
class RandomBlocks(BlockImportance):
    """Seeded random scores (a baseline)."""

    needs_data = False

    def scores(self, ctx: BlockContext) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(ctx.group.id.encode())])
        return rng.random(ctx.group.size)


# ------------------------------------------------------------------------------------------
# The pass
# ------------------------------------------------------------------------------------------
def _requires(model: Any, analysis: Any, *args: Any, **kwargs: Any) -> None:
    check(isinstance(model, torch.nn.Module), BadInputError,
          f"score_blocks() needs the nn.Module, got {type(model).__name__}")
    check(hasattr(analysis, "blocks"), BadInputError, "score_blocks() needs the Analysis from fxprune.analyze")


@fxpass("score_blocks", requires=_requires)
def score_blocks(
    model: torch.nn.Module,
    analysis: Any,
    batches: Sequence[Any] | None = None,
    *,
    importance: str = "shortgpt",
    normalize: str | None = "mean",
    device: str | torch.device = "auto",
    loss_fn: Any = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Scores:
    """Score every branch of every blocks group of ``analysis`` (higher = keep).

    Args:
        model: the module the analysis was traced from (its weights are the program's).
        analysis: the :class:`~fxprune.passes.analysis.Analysis` (its ``blocks`` groups).
        batches: calibration batches (dicts of the traced inputs; ``labels`` are ignored).
        importance: a name in :data:`BLOCK_IMPORTANCE`: ``shortgpt`` (default), ``sleb``,
            ``ppl``, ``taylor+``, ``curvature``, ``random``.
        normalize: rescaling from :data:`fxprune.passes.scoring.NORMALIZERS` (``"mean"``: 1.0 is
            an average branch), so blocks can be ranked against width units by a global planner.
        options: criterion options (``steps=`` for SLEB, ``cost=`` for curvature).

    Returns:
        :class:`~fxprune.passes.scoring.Scores` ``{"blocks": scores}``.
    """
    crit = _lookup(BLOCK_IMPORTANCE, importance, "block importance criterion")(seed=seed, **options)
    norm = _lookup(NORMALIZERS, normalize, "normalize")
    batches = list(batches) if batches is not None else None
    if crit.needs_data and not batches:
        raise DataError(f"block importance {importance!r} needs calibration batches; 'random' needs none")
    if analysis.graph.on_meta and crit.needs_data:
        raise ScoringError("the analysis was traced on the meta device: there are no weights to score with")
    out: dict[str, np.ndarray] = {}
    dev = resolve_device(device)
    home = model_device(model)
    moved = home is not None and home != dev and not (home.type == dev.type and dev.index is None)
    run_on = dev if moved or home is None else home
    try:
        if moved:
            model.to(dev)
        with eval_mode(model), torch.random.fork_rng():
            torch.manual_seed(seed)
            for group in analysis.blocks:
                ctx = BlockContext(model, analysis, group, batches or [], run_on, loss_fn, progress)
                s = np.asarray(crit.scores(ctx), dtype=np.float64)
                if s.shape != (group.size,) or not np.all(np.isfinite(s)):
                    raise ScoringError(f"block criterion {importance!r} gave {s.shape} scores for "
                                       f"{group.size} branches (or non-finite ones)")
                out[group.id] = np.asarray(norm(s), dtype=np.float64)
    finally:
        if moved:
            model.to(home)
    n_tokens = sum(int(b["input_ids"].numel()) for b in (batches or []) if isinstance(b, Mapping) and "input_ids" in b)
    return Scores(out, importance, "branch", normalize, len(batches or []), n_tokens)

