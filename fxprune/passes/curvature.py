"""Curvature math for structured pruning: K-FAC (The LLM Surgeon) and layer-wise OBS (ZipLM).

Everything here is a function of **one layer**: its :class:`~fxprune.passes.stats.LayerStats`
(sums gathered by module hooks), its weight as a ``[d_out, d_in]`` matrix (plus its bias) and the
rows/columns a plan removes.  That is what lets a block-by-block driver call it per block, and
what keeps the scoring criteria (:mod:`fxprune.passes.scoring`: ``surgeon``, ``obs``) and the
update methods (:mod:`fxprune.passes.update`) on one source of truth.

Notation (see /work/shared/DESIGN.md, "Weight updates"): ``W`` is ``d_out x d_in``; with a bias,
``Wb = [W | b]`` and ``A`` has a constant-1 column appended.  ``A = E[x xᵀ]``, ``G = E[g gᵀ]``
(``g`` the per-token loss gradient at the layer output), both per calibration token.

* **Damping**: ``M̃ = M + 0.01 · mean(diag M) · I`` (an absolute floor when the diagonal is 0: a
  layer no data reached, or dead inputs).  **Balancing** rescales ``A`` and ``G`` to the same
  Frobenius norm before damping; with *relative* damping the costs and updates do not change
  (the scales cancel), it only keeps fp32 factors away from under/overflow.
* **K-FAC costs** (no first-order term), for the index set ``R`` of rows / ``C`` of columns one
  unit covers on one member (the joint cost of the block, which is the LLM Surgeon's row/column
  cost when the block is one index):

  - rows: ``½ tr((G̃⁻¹[R,R])⁻¹ (Wb A Wbᵀ)[R,R])``;
  - columns: ``½ tr((Wᵀ G W)[C,C] (Ã⁻¹[C,C])⁻¹)``; where ``G`` is not stored (layers whose rows
    never go, e.g. an LM head over the vocabulary) the diagonal of ``Wᵀ G W`` is
    (``grad_input_sq``) and the cost is the sum of the per-column costs.
* **K-FAC correlated update** for all rows ``R`` and columns ``C`` removed in a layer at once:
  ``ΔW = −G̃⁻¹[:,R] (G̃⁻¹[R,R])⁻¹ Wb[R,:] − Wb[:,C] (Ã⁻¹[C,C])⁻¹ Ã⁻¹[C,:]`` (both from the same
  ``Wb``); the removed rows and columns are then sliced away by the rewrite.
* **OBS** (forward only, ``H = A``): cost of columns ``M``: ``½ tr(W[:,M] (H̃⁻¹[M,M])⁻¹ W[:,M]ᵀ)``;
  update ``W[:,K] += W[:,M] H̃[M,K] H̃[K,K]⁻¹`` (the least-squares reconstruction of the layer's
  output from the kept inputs; the bias column, when gathered, is always kept, so it absorbs the
  removed inputs' mean).  Costs are absolute (``½ E‖ΔY‖²`` per token): the consumers OBS costs by
  default (``o_proj``, ``down_proj``) all write into the residual stream, so their errors live in
  one space and rank against each other.  ``relative=True`` divides by the layer's output energy
  ``½ tr(W A Wᵀ)`` instead; on the benchmark LM that over-pruned the first block's MLP (ppl 62
  against 21.6 absolute at 20%).

Math runs in float64 on the statistics' device (CPU by default); the factors themselves are kept
in whatever dtype the statistics pass gathered them (float32 by default).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterator, Mapping, MutableMapping, Sequence

import numpy as np
import torch
from torch import nn

from fxprune.errors import ScoringError
from fxprune.passes.stats import LayerStats, adapter_of
from fxprune.util.hf import linear_input_dim

__all__ = [
    "DAMPING", "Contraction", "contraction_of", "damped", "balance", "LayerCurvature",
    "kfac_row_costs", "kfac_col_costs", "obs_col_costs", "kfac_update", "obs_update",
    "flap_bias_delta", "weight_matrix", "write_weight_matrix", "sampled_label_loss",
]

DAMPING = 0.01
"""Relative damping: ``0.01 · mean(diag)`` (the LLM Surgeon's and ZipLM's default)."""

MAX_BLOCK = 1024
"""Units covering more indices than this on one member use the sum of per-index costs."""


# ------------------------------------------------------------------------------------------
# Which side of a layer's matrix a member sits on
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Contraction:
    """How indices along one weight dim map onto the layer's ``[d_out, d_in]`` matrix.

    ``side`` is ``"rows"`` (output features) or ``"cols"`` (input features); index ``i`` of the
    dim covers matrix indices ``i * width ... i * width + width - 1`` (``width`` > 1 for a conv's
    input channel: its kernel positions, the im2col columns).
    """

    side: str
    width: int = 1

    def matrix_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if self.width == 1:
            return idx
        return (idx[:, None] * self.width + np.arange(self.width)[None, :]).reshape(-1)


def contraction_of(module: nn.Module, attr: str, dim: int) -> Contraction | None:
    """The matrix side of ``module.<attr>`` dim ``dim``, or None when it is no linear contraction.

    Linear-like layers the statistics pass supports with covariances (``nn.Linear``, HF
    ``Conv1D``, non-grouped ``Conv1d/2d``): the weight's input dim is columns, its output dim rows.
    Biases, norms, embeddings, grouped/transposed convs and buffers return None (the criteria
    fall back to first order for them).
    """
    if attr != "weight" or adapter_of(module, cov=True) is None:
        return None
    in_dim = linear_input_dim(module)
    if in_dim is None:
        return None
    w = module.weight
    out_dim = 1 if in_dim == 0 else 0
    if dim == in_dim:
        width = math.prod(w.shape[2:]) if w.dim() > 2 else 1
        return Contraction("cols", int(width))
    if dim == out_dim:
        return Contraction("rows", 1)
    return None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[d_out, d_in]`` (a view where possible)."""
    adapter = adapter_of(module)
    assert adapter is not None
    return adapter.weight_matrix(module)


def write_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (``[d_out, d_in]``) back in the layout of ``module.weight``."""
    w = module.weight
    if linear_input_dim(module) == 0:  # HF Conv1D stores [in, out]
        return matrix.t().reshape(w.shape).to(w.dtype).contiguous()
    return matrix.reshape(w.shape).to(w.dtype).contiguous()


# ------------------------------------------------------------------------------------------
# Factors
# ------------------------------------------------------------------------------------------
def damped(m: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """``m + damping · mean(diag m) · I`` (``damping · I`` when the diagonal is all zero)."""
    d = float(torch.diagonal(m).mean()) if m.numel() else 0.0
    lam = damping * d if d > 0 and math.isfinite(d) else damping
    out = m.clone()  # no identity matrix: at 11008² in float64 that is a gigabyte
    out.diagonal().add_(lam)
    return out


def shrinkage(xxT: torch.Tensor, spread: torch.Tensor | None, n: int) -> float:
    """The Ledoit-Wolf shrinkage of ``A = xxT / n`` toward ``mean(diag A) · I``, as a relative
    damping ``α / (1 - α)``: how far the calibration data leave the estimate from the true moment.

    ``α = min(b², d²) / d²`` with ``d² = ||A - μI||²_F`` and ``b²`` the variance of the estimate
    (Ledoit & Wolf, 2004), measured between the batches it was summed from (``spread`` =
    ``[Σ_b ||C_b||²_F, Σ_b n_b²]``): ``b² = Σ_b ||C_b||²_F / n² - ||A||²_F · Σ_b n_b² / n²``.  Tokens
    of one window are correlated, so batches, not tokens, are the samples.  Many batches give
    ``α → 0``; few for a wide layer (an MLP's down projection on 16 calibration windows) give the
    larger damping the estimate needs.  0 without the spread, or from a single batch.
    """
    if spread is None or n <= 1:
        return 0.0
    c2, nb2 = float(spread[0]), float(spread[1])
    if nb2 >= n * n:  # one batch: no spread to measure
        return 0.0
    a = xxT.to(torch.float64) / n
    dim = a.shape[0]
    mu = float(torch.diagonal(a).mean())
    frob2 = float((a * a).sum())
    d2 = frob2 - mu * mu * dim
    b2 = c2 / (n * n) - frob2 * nb2 / (n * n)
    if not (mu > 0 and d2 > 0 and math.isfinite(b2)):
        return 0.0
    alpha = min(max(b2, 0.0), d2) / d2
    return alpha / (1.0 - alpha) if alpha < 1.0 else 1e6


def balance(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale ``a`` and ``g`` to the same Frobenius norm; ``a ⊗ g`` is unchanged."""
    na, ng = float(torch.linalg.matrix_norm(a)), float(torch.linalg.matrix_norm(g))
    if na <= 0 or ng <= 0 or not (math.isfinite(na) and math.isfinite(ng)):
        return a, g
    s = math.sqrt(na * ng)
    return a * (s / na), g * (s / ng)


def damped_inverse(m: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """``damped(m)⁻¹`` for a symmetric positive semi-definite ``m`` (Cholesky; ``linalg.inv`` if
    the damped matrix is not positive definite).  At most three matrices of ``m``'s size are alive
    at once (``m``, the damped copy or its factor, the inverse)."""
    d = damped(m, damping)
    factor, info = torch.linalg.cholesky_ex(d)
    if int(info) != 0:
        return torch.linalg.inv(d)
    del d
    return torch.cholesky_inverse(factor)


@dataclasses.dataclass
class LayerCurvature:
    """One layer's weight and its (damped, balanced) factors, ready for costs and updates.

    Built by :meth:`of` from one layer's statistics; inverses are computed on first use and
    cached on the instance, which lives only while its layer is being handled.
    """

    name: str
    Wb: torch.Tensor  # [d_out, d_in (+1 bias column)] float64
    has_bias_col: bool
    A: torch.Tensor | None  # E[x xᵀ] (+ bias column), balanced, undamped
    G: torch.Tensor | None  # E[g gᵀ], balanced, undamped
    gx_diag: torch.Tensor | None  # diag(Wᵀ G W) when G is not stored
    damping: float = DAMPING
    reached: bool = True
    damping_A: float = DAMPING  # A's: at least ``damping``, more where few tokens estimate it (shrinkage)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, name: str, ls: LayerStats | None, weight: torch.Tensor, bias: torch.Tensor | None, *,
           damping: float = DAMPING, need_grad: bool = True, shrink: bool = False) -> "LayerCurvature":
        """Factors of layer ``name`` from its statistics (``None``: no data reached it).

        ``weight`` is the ``[d_out, d_in]`` matrix.  A layer no calibration data reached gets
        zero statistics (damping alone, i.e. ``damping · I``) and a warning.  Non-finite weights
        or statistics raise :class:`ScoringError` naming the layer.  ``shrink``: damp ``A`` by at
        least its Ledoit-Wolf shrinkage (:func:`shrinkage`); the LLM Surgeon's K-FAC costs and
        updates do (measured better on every benchmark LM), forward-only OBS does not (it was worse).
        """
        w = weight.detach().to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise ScoringError(f"layer {name!r}: its weight has NaN/inf entries")
        d_out, d_in = w.shape
        reached = ls is not None and ls.xxT is not None and ls.cov_count > 0
        if not reached:
            warnings.warn(f"no calibration data reached layer {name!r}; its curvature is damping alone "
                          "(its units look cheap to remove)", stacklevel=3)
            a = torch.zeros(d_in, d_in, dtype=torch.float64, device=w.device)
            bias_col = False
        else:
            a = ls.A.to(torch.float64)
            bias_col = a.shape[0] == d_in + 1  # a shared slot may carry another layer's bias column
            if a.shape[0] not in (d_in, d_in + 1):
                raise ScoringError(f"layer {name!r}: input statistics of size {a.shape[0]} for a weight with "
                                   f"{d_in} input features")
        if not bool(torch.isfinite(a).all()):
            raise ScoringError(f"layer {name!r}: its input statistics have NaN/inf entries (check the "
                               "calibration data and the layers before it)")
        if bias_col:
            b = bias.detach().to(torch.float64).reshape(-1, 1) if bias is not None else w.new_zeros(d_out, 1)
            wb = torch.cat([w, b.to(w.device)], dim=1)
        else:
            wb = w
        g = gx = None
        if need_grad:
            if ls is not None and ls.ggT is not None and ls.grad_count > 0:
                g = ls.G.to(torch.float64)
            elif ls is not None and ls.gx_sq is not None and ls.grad_count > 0:
                gx = (ls.gx_sq / ls.grad_count).to(torch.float64)
            else:
                if reached:
                    warnings.warn(f"no output gradient reached layer {name!r}; its rows use an identity G",
                                  stacklevel=3)
                g = torch.zeros(d_out, d_out, dtype=torch.float64, device=w.device)
            for t in (g, gx):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ScoringError(f"layer {name!r}: its output-gradient statistics have NaN/inf entries")
            if g is not None and reached:
                a, g = balance(a, g)
        damping_a = damping
        if shrink and reached and damping > 0:  # (G keeps the plain damping: shrinking it was worse)
            damping_a = max(damping, shrinkage(ls.xxT, ls.xspread, ls.cov_count))
        return cls(name, wb, bias_col, a, g, gx, damping, reached, damping_a)

    @property
    def d_out(self) -> int:
        return self.Wb.shape[0]

    @property
    def d_in(self) -> int:
        return self.Wb.shape[1] - int(self.has_bias_col)

    def _get(self, key: str, make: Any) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def A_inv(self) -> torch.Tensor:
        return self._get("A_inv", lambda: damped_inverse(self.A, self.damping_A))

    @property
    def G_inv(self) -> torch.Tensor:
        return self._get("G_inv", lambda: damped_inverse(self.G, self.damping))

    @property
    def output_energy(self) -> float:
        """``½ tr(Wb A Wbᵀ)``: half the mean squared output per token."""
        return self._get("energy", lambda: torch.tensor(0.5 * float((self.Wb @ self.A * self.Wb).sum()))).item()


# ------------------------------------------------------------------------------------------
# Costs (one entry per unit; ``units[u]`` = the matrix rows / columns unit u covers)
# ------------------------------------------------------------------------------------------
def _block_costs(units: Sequence[np.ndarray], inv: torch.Tensor, num_block: Any, num_diag: Any) -> np.ndarray:
    """``½ tr((inv[U,U])⁻¹ num_block(U))`` per unit ``U`` (blocks up to MAX_BLOCK, else diagonal).

    ``num_diag(idx)`` is the diagonal of ``num_block(idx)`` (one vectorised call for the indices of
    every single-index unit)."""
    out = np.zeros(len(units), dtype=np.float64)
    diag = torch.diagonal(inv)
    single = [i for i, idx in enumerate(units) if len(idx) == 1]
    if single:
        t = torch.as_tensor(np.concatenate([units[i] for i in single]), dtype=torch.long, device=inv.device)
        out[single] = (0.5 * num_diag(t) / diag[t]).cpu().numpy()
    for i, idx in enumerate(units):
        if len(idx) == 1:
            continue
        if len(idx) == 0:
            continue
        t = torch.as_tensor(idx, dtype=torch.long, device=inv.device)
        num = num_block(t)
        if len(idx) == 1 or len(idx) > MAX_BLOCK:
            out[i] = 0.5 * float((torch.diagonal(num) / diag[t]).sum())
        else:
            sub = inv.index_select(0, t).index_select(1, t)
            out[i] = 0.5 * float(torch.trace(torch.linalg.solve(sub, num)))
    return out


def kfac_row_costs(lc: LayerCurvature, units: Sequence[np.ndarray]) -> np.ndarray:
    """LLM Surgeon row costs ``½ tr((G̃⁻¹[R,R])⁻¹ (Wb A Wbᵀ)[R,R])`` per unit."""
    if lc.G is None:
        raise ScoringError(f"layer {lc.name!r}: row costs need the output-gradient covariance G")
    wa = lc.Wb @ lc.A

    def num(t: torch.Tensor) -> torch.Tensor:
        return wa.index_select(0, t) @ lc.Wb.index_select(0, t).t()

    def num_diag(t: torch.Tensor) -> torch.Tensor:
        return (wa.index_select(0, t) * lc.Wb.index_select(0, t)).sum(1)

    return _block_costs(units, lc.G_inv, num, num_diag)


def kfac_col_costs(lc: LayerCurvature, units: Sequence[np.ndarray]) -> np.ndarray:
    """LLM Surgeon column costs ``½ tr((Wᵀ G W)[C,C] (Ã⁻¹[C,C])⁻¹)`` per unit."""
    if lc.G is not None:
        gw = lc.G @ lc.Wb

        def num(t: torch.Tensor) -> torch.Tensor:
            return lc.Wb.index_select(1, t).t() @ gw.index_select(1, t)

        def num_diag(t: torch.Tensor) -> torch.Tensor:
            return (lc.Wb.index_select(1, t) * gw.index_select(1, t)).sum(0)

        return _block_costs(units, lc.A_inv, num, num_diag)
    if lc.gx_diag is None:
        raise ScoringError(f"layer {lc.name!r}: column costs need G or diag(Wᵀ G W)")
    diag_ainv = torch.diagonal(lc.A_inv)
    per = (lc.gx_diag / diag_ainv[: lc.d_in]).cpu().numpy()
    return np.array([0.5 * float(per[idx].sum()) if len(idx) else 0.0 for idx in units])


def obs_col_costs(lc: LayerCurvature, units: Sequence[np.ndarray], relative: bool = False) -> np.ndarray:
    """Layer-wise OBS costs ``½ tr(W[:,M] (H̃⁻¹[M,M])⁻¹ W[:,M]ᵀ)`` per unit (optionally relative)."""

    def num(t: torch.Tensor) -> torch.Tensor:
        wm = lc.Wb.index_select(1, t)
        return wm.t() @ wm

    def num_diag(t: torch.Tensor) -> torch.Tensor:
        return lc.Wb.index_select(1, t).pow(2).sum(0)

    costs = _block_costs(units, lc.A_inv, num, num_diag)
    if relative:
        energy = lc.output_energy
        if energy > 0:
            costs = costs / energy
    return costs


# ------------------------------------------------------------------------------------------
# Updates: the new [d_out, d_in] weight and bias (removed rows/columns are left for the rewrite)
# ------------------------------------------------------------------------------------------
def _split(lc: LayerCurvature, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if lc.has_bias_col:
        return wb[:, :-1], wb[:, -1]
    return wb, None


def kfac_update(lc: LayerCurvature, rows: Sequence[int], cols: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LLM Surgeon's correlated update for rows ``rows`` and columns ``cols`` removed jointly."""
    wb = lc.Wb
    delta = torch.zeros_like(wb)
    if len(rows) and lc.G is not None:
        r = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=wb.device)
        ginv = lc.G_inv
        delta -= ginv.index_select(1, r) @ torch.linalg.solve(ginv.index_select(0, r).index_select(1, r),
                                                              wb.index_select(0, r))
    if len(cols):
        c = torch.as_tensor(np.asarray(cols), dtype=torch.long, device=wb.device)
        ainv = lc.A_inv
        x = torch.linalg.solve(ainv.index_select(0, c).index_select(1, c), ainv.index_select(0, c))
        delta -= wb.index_select(1, c) @ x
    return _split(lc, wb + delta)


def obs_update(lc: LayerCurvature, cols: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W[:,K] += W[:,M] H̃[M,K] H̃[K,K]⁻¹`` for the removed input columns ``M`` (bias column kept)."""
    wb = lc.Wb.clone()
    if len(cols):
        n = wb.shape[1]
        m = torch.as_tensor(np.asarray(cols), dtype=torch.long, device=wb.device)
        keep = torch.ones(n, dtype=torch.bool, device=wb.device)
        keep[m] = False
        k = torch.nonzero(keep).squeeze(1)
        h = damped(lc.A, lc.damping_A)
        h_kk = h.index_select(0, k).index_select(1, k)
        h_km = h.index_select(0, k).index_select(1, m)
        try:
            x = torch.cholesky_solve(h_km, torch.linalg.cholesky(h_kk))  # H_KK⁻¹ H_KM: [K, M]
        except RuntimeError:
            x = torch.linalg.solve(h_kk, h_km)
        wb[:, k] += wb.index_select(1, m) @ x.t()
    return _split(lc, wb)


def flap_bias_delta(weight: torch.Tensor, mean: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """FLAP's bias compensation ``W[:, P] · x̄[P]`` for removed input columns ``P`` (``[d_out]``)."""
    c = torch.as_tensor(np.asarray(cols), dtype=torch.long, device=weight.device)
    return weight.detach().to(torch.float64).index_select(1, c) @ mean.to(weight.device, torch.float64).index_select(0, c)


# ------------------------------------------------------------------------------------------
def sampled_label_loss(output: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy against labels sampled from the model's own predictions (the true Fisher).

    Pass as ``loss_fn=`` to ``score(importance="surgeon")`` for the sampled-label Fisher; the
    default is the empirical Fisher of the model's loss on the data.
    """
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise ScoringError("the sampled-label Fisher needs a model that returns logits")
    from fxprune.passes.stats import sampled_cross_entropy

    return sampled_cross_entropy(logits)


# ------------------------------------------------------------------------------------------
# Groups -> layers: where each member sits, and which statistics each layer needs
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Role:
    """One member of one group in one layer (a tied tensor has one role per module using it)."""

    group: str
    layer: str  # module path
    attr: str  # "weight", "bias", ...
    dim: int
    contraction: Contraction | None
    units: tuple[np.ndarray, ...]  # indices along ``dim`` per unit

    @property
    def key(self) -> str:
        return f"{self.layer + '.' if self.layer else ''}{self.attr}:{self.dim}"


def unit_indices(member: Any, size: int) -> tuple[np.ndarray, ...]:
    """``member.indices([u])`` for every unit ``u`` (vectorised over the layout)."""
    from fxprune.graph import cached_coords

    us, ix = [], []
    for arr in cached_coords(member.layout).get(member.class_id, ()):
        ok = np.nonzero(arr >= 0)[0]
        us.append(arr[ok])
        ix.append(ok)
    if not us:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(size))
    units, idx = np.concatenate(us), np.concatenate(ix)
    order = np.lexsort((idx, units))
    units, idx = units[order], idx[order]
    keep = np.ones(len(units), dtype=bool)
    keep[1:] = (units[1:] != units[:-1]) | (idx[1:] != idx[:-1])
    units, idx = units[keep], idx[keep]
    bounds = np.searchsorted(units, np.arange(size + 1))
    return tuple(idx[bounds[u]:bounds[u + 1]] for u in range(size))


def tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(tensor) -> every FQN`` of the model's parameters (tied tensors have several)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def roles_of(model: nn.Module, groups: Sequence[Any]) -> list[Role]:
    """Every (group, parameter member, module using it) of ``groups`` in ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names = tensor_names(model)
    out: list[Role] = []
    for g in groups:
        seen: set[tuple] = set()
        for m in g.params:
            p = params.get(m.name)
            if p is None:
                raise ScoringError(f"group {g.id!r}: member {m.name!r} is not a parameter of the model")
            units: tuple[np.ndarray, ...] | None = None
            for alias in names[id(p)]:
                path, _, attr = alias.rpartition(".")
                key = (path, attr, m.dim, m.layout, m.class_id)
                if key in seen:
                    continue
                seen.add(key)
                units = units if units is not None else unit_indices(m, g.size)
                module = model.get_submodule(path) if path else model
                out.append(Role(g.id, path, attr, m.dim, contraction_of(module, attr, m.dim), units))
    return out


def first_order_ok(module: nn.Module, attr: str, dim: int) -> bool:
    """Whether the output-feature Taylor statistic scores ``module.<attr>`` dim ``dim``.

    That is where the module's output last dim is the member's feature: embedding tables (dim 1)
    and the 1-D weights/biases of layer/RMS norms (channel-first norms and convs are not).
    """
    if isinstance(module, nn.Embedding):
        return attr == "weight" and dim == 1
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.conv._ConvNd)):
        return False
    p = getattr(module, attr, None)
    return isinstance(p, torch.Tensor) and p.dim() == 1 and "norm" in type(module).__name__.lower()


def diag_fisher_ok(module: nn.Module, attr: str) -> bool:
    """Whether ``module.<attr>`` gets the diagonal-Fisher fallback: a parameter (not a layer's
    ``bias``, which goes with its rows) that no contraction or output statistic covers, such as
    the 3-D weights of fused expert layers."""
    return attr != "bias" and isinstance(getattr(module, attr, None), nn.Parameter)


def stat_specs(model: nn.Module, roles: Sequence[Role], method: str) -> dict[str, Any]:
    """The per-layer :class:`StatSpec` ``method`` (``"surgeon"`` or ``"obs"``) needs for ``roles``."""
    from fxprune.passes.stats import StatSpec

    sides: dict[str, set[str]] = {}
    taylor: set[str] = set()
    diag: dict[str, set[str]] = {}
    for r in roles:
        if r.contraction is not None:
            sides.setdefault(r.layer, set()).add(r.contraction.side)
        elif method == "surgeon" and first_order_ok(model.get_submodule(r.layer), r.attr, r.dim):
            taylor.add(r.layer)
        elif method == "surgeon" and diag_fisher_ok(model.get_submodule(r.layer), r.attr):
            diag.setdefault(r.layer, set()).add(r.attr)
    specs: dict[str, Any] = {}
    for layer, s in sides.items():
        pf = tuple(sorted(diag.get(layer, ())))
        if method == "surgeon":
            specs[layer] = StatSpec(input_cov=True, bias_column=True, grad_cov="rows" in s,
                                    grad_input_sq="rows" not in s, param_fisher=pf)
        elif "cols" in s:
            specs[layer] = StatSpec(input_cov=True, bias_column=True)
    for layer in (taylor | set(diag)) - set(specs):
        specs[layer] = StatSpec(output_taylor=layer in taylor, param_fisher=tuple(sorted(diag.get(layer, ()))))
    return specs


def spec_bytes(model: nn.Module, layer: str, spec: Any, itemsize: int = 4) -> int:
    """An upper bound on the bytes ``spec`` gathers for ``layer`` (shared input slots counted per layer)."""
    module = model.get_submodule(layer)
    n = sum(getattr(module, a).numel() for a in spec.param_fisher)  # one float per parameter entry
    if spec.output_only:
        return n * itemsize
    w = weight_matrix(module)
    d_out, d_in = int(w.shape[0]), int(w.shape[1]) + 1
    n += (d_in * d_in if spec.input_cov else 0) + (d_out * d_out if spec.grad_cov else 0)
    n += d_in * (2 if spec.input_moments else 0) + (d_in if spec.grad_input_sq else 0)
    return n * itemsize


def chunk_layers(model: nn.Module, specs: Mapping[str, Any], budget: int | None) -> list[list[str]]:
    """Consecutive layers (module order) whose statistics fit ``budget`` bytes each (None: one chunk)."""
    order = [n for n, _ in model.named_modules() if n in specs]
    if budget is None:
        return [order] if order else []
    chunks: list[list[str]] = []
    size = 0
    for n in order:
        b = spec_bytes(model, n, specs[n])
        if chunks and size + b <= budget:
            chunks[-1].append(n)
            size += b
        else:
            chunks.append([n])
            size = b
    return chunks


class CurvatureSource:
    """Where curvature statistics come from: one gathering kept whole when it fits ``budget``
    bytes, otherwise chunks of consecutive layers gathered (and freed) one after the other.

    The scoring criteria and the update methods both read statistics through :meth:`iter_stats`,
    so the update re-gathers on the same calibration batches exactly when scoring could not keep
    everything (each re-gathering is one more forward/backward over the batches).
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any], *, loss_fn: Any = None,
                 device: Any = "auto", stats_device: Any = "cpu", dtype: torch.dtype = torch.float32,
                 budget: int | None = None, progress: bool = True,
                 reduce: Callable[[Any], Any] | None = None) -> None:
        self.batches = list(batches)
        self.reduce = reduce  # sums each gathering over data shards (DistContext.reduce_stats)
        self.loss_fn = loss_fn
        self.device = device
        self.stats_device = stats_device
        self.dtype = dtype
        self.budget = budget
        self.progress = progress
        self.kept: Any = None  # Stats kept from a single gathering
        self.gatherings = 0
        self.peak_stats_bytes = 0
        self.damping = DAMPING  # set by the criterion: its damping, and whether
        self.shrink = False  # surgeon's A is damped by at least its Ledoit-Wolf shrinkage

    def each_chunk(self, model: nn.Module, specs: Mapping[str, Any], fn: Callable[[list[str], Any], None]) -> None:
        """Call ``fn(layers, stats)`` for chunks covering every layer of ``specs``, each while those
        layers' weights are in ``model`` (always, in memory; sequential mode overrides this and runs
        ``fn`` block by block while the block is onloaded)."""
        for layers, stats in self.iter_stats(model, specs):
            fn(layers, stats)

    def iter_stats(self, model: nn.Module, specs: Mapping[str, Any]) -> Iterator[tuple[list[str], Any]]:
        """Yield ``(layers, Stats)`` covering every layer of ``specs``, chunk by chunk."""
        from fxprune.passes.stats import gather_stats

        if self.kept is not None and _covers(self.kept, specs):
            yield list(specs), self.kept
            return
        chunks = chunk_layers(model, specs, self.budget)
        for chunk in chunks:
            stats = gather_stats(model, self.batches, {n: specs[n] for n in chunk}, loss_fn=self.loss_fn,
                                 device=self.device, stats_device=self.stats_device, dtype=self.dtype,
                                 progress=self.progress)
            if self.reduce is not None:
                stats = self.reduce(stats)
            self.gatherings += 1
            self.peak_stats_bytes = max(self.peak_stats_bytes, stats.nbytes)
            if len(chunks) == 1:
                self.kept = stats
            yield chunk, stats
            del stats


def _covers(stats: Any, specs: Mapping[str, Any]) -> bool:
    """Whether ``stats`` has what ``specs`` asks for every layer it reached."""
    from fxprune.passes.stats import spec_of

    for n, want in specs.items():
        try:
            have = spec_of(stats.spec, n)
        except KeyError:
            return False
        if (want.input_cov and not have.input_cov) or (want.grad_cov and not have.grad_cov) \
                or (want.output_taylor and not have.output_taylor) \
                or not set(want.param_fisher) <= set(have.param_fisher) \
                or (want.grad_input_sq and not (have.grad_input_sq or have.grad_cov)):
            return False
    return True


# ------------------------------------------------------------------------------------------
# Group costs
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupCosts:
    """Per-unit costs of every group, and how each member was costed (``role key -> how``)."""

    costs: Mapping[str, np.ndarray]
    how: Mapping[str, str]
    stats_bytes: int
    gatherings: int
    unscored: frozenset[str] = frozenset()  # groups none of whose members could be costed


def group_costs(model: nn.Module, groups: Sequence[Any], source: CurvatureSource, method: str, *,
                damping: float = DAMPING, relative: bool = False) -> GroupCosts:
    """Per-unit removal costs of ``groups`` under ``method`` (``"surgeon"`` or ``"obs"``).

    A unit's cost is the sum over its group's members of the member's cost on the side it sits:
    K-FAC rows/columns (surgeon), OBS columns (obs; producer rows get none, the consumers'
    reconstruction covers them), first-order output Taylor for embeddings and norms (surgeon), and
    the diagonal Fisher ``½ Σ θ² E[(∂ℓ/∂θ)²]`` over the unit's slice for other parameters
    (surgeon; no update compensates them, so the cost is the uncompensated one), and nothing for
    members none covers (reported in ``how``).
    """
    roles = roles_of(model, groups)
    specs = stat_specs(model, roles, method)
    shrink = method == "surgeon" and getattr(source, "shrink", False)
    sizes = {g.id: g.size for g in groups}
    costs = {gid: np.zeros(n, dtype=np.float64) for gid, n in sizes.items()}
    how: dict[str, str] = {}
    by_layer: dict[str, list[Role]] = {}
    for r in roles:
        if r.layer in specs:
            by_layer.setdefault(r.layer, []).append(r)
        elif r.contraction is not None and r.contraction.side == "rows":
            how[r.key] = "producer rows: forward-only OBS costs the consumers"
        elif r.attr == "bias":
            how[r.key] = "bias: not scored (removed with its layer's rows)"
        elif method == "obs":
            how[r.key] = "not scored by forward-only OBS (its group's consumer columns carry the cost)"
        else:
            how[r.key] = "not scored: no linear contraction and no first-order statistic"

    def chunk(layers: list[str], stats: Any) -> None:
        for layer in layers:
            module = model.get_submodule(layer)
            ls = stats.layers.get(layer)
            spec = specs[layer]
            roles_here = by_layer.get(layer, [])
            if spec.param_fisher:
                _diag_fisher(module, layer, ls, [r for r in roles_here if r.contraction is None
                                                  and r.attr in spec.param_fisher], spec.param_fisher, costs, how, scored)
                roles_here = [r for r in roles_here if r.contraction is not None or r.attr not in spec.param_fisher]
            if spec.output_only:
                _first_order(layer, ls, roles_here, costs, how, scored)
                continue
            lc = LayerCurvature.of(layer, ls, weight_matrix(module), getattr(module, "bias", None),
                                   damping=damping, need_grad=method == "surgeon",
                                   shrink=shrink)
            for r in roles_here:
                if r.contraction is None:
                    how[r.key] = ("bias: with its layer's rows (bias column of A)" if r.attr == "bias"
                                  else "not scored: no linear contraction")
                    continue
                mats = [r.contraction.matrix_indices(u) for u in r.units]
                if r.contraction.side == "rows":
                    if method != "surgeon":
                        how[r.key] = "producer rows: forward-only OBS costs the consumers"
                        continue
                    c = kfac_row_costs(lc, mats)
                    how[r.key] = "K-FAC rows"
                elif method == "surgeon":
                    c = kfac_col_costs(lc, mats)
                    how[r.key] = "K-FAC columns" if lc.G is not None else "K-FAC columns (diag Wᵀ G W)"
                else:
                    c = obs_col_costs(lc, mats, relative=relative)
                    how[r.key] = "OBS columns" + (" (relative)" if relative else "")
                if not lc.reached:
                    how[r.key] += " [no calibration data: damped]"
                costs[r.group] += c
                scored.add(r.group)
            del lc

    scored: set[str] = set()  # groups at least one member of which got a cost
    source.each_chunk(model, specs, chunk)
    gaps = {r.group for r in roles if how.get(r.key, "").startswith("not scored")}
    unscored = set()
    for gid, c in costs.items():
        if not np.all(np.isfinite(c)):
            raise ScoringError(f"group {gid!r}: non-finite curvature costs")
        if gid in gaps and gid not in scored:  # the criterion ranks it by weight norm (scoring._norm_fallback)
            unscored.add(gid)
    return GroupCosts(costs, how, source.peak_stats_bytes, source.gatherings, frozenset(unscored))


def _diag_fisher(module: nn.Module, layer: str, ls: Any, roles: Sequence[Role], order: Sequence[str],
                 costs: dict[str, np.ndarray], how: dict[str, str], scored: set[str]) -> None:
    params = {a: getattr(module, a) for a in order}
    for r in roles:
        if ls is None or ls.pg_sq is None or ls.pg_count == 0:
            how[r.key] = "diagonal Fisher: no gradient reached it (cost 0)"
            continue
        w = params[r.attr].detach()
        f = ls.param_fisher(r.attr, params, order).to(w.device, torch.float64)
        if not bool(torch.isfinite(f).all()):
            raise ScoringError(f"layer {layer!r}: non-finite gradient statistics for {r.attr!r}")
        per = (0.5 * w.to(torch.float64).pow(2) * f).movedim(r.dim, 0).reshape(w.shape[r.dim], -1).sum(1).cpu().numpy()
        costs[r.group] += np.array([float(per[u].sum()) if len(u) else 0.0 for u in r.units])
        scored.add(r.group)
        how[r.key] = "diagonal Fisher (per-batch gradients ½ Σ θ²·E[g²], not compensated)"


def _first_order(layer: str, ls: Any, roles: Sequence[Role], costs: dict[str, np.ndarray],
                 how: dict[str, str], scored: set[str]) -> None:
    for r in roles:
        if ls is None or ls.yg is None or ls.grad_count == 0:
            how[r.key] = "first order: no gradient reached it (cost 0)"
            continue
        yg = (ls.yg / ls.grad_count).to(torch.float64).cpu().numpy()
        if not np.all(np.isfinite(yg)):
            raise ScoringError(f"layer {layer!r}: non-finite first-order statistics")
        costs[r.group] += np.array([abs(float(yg[u].sum())) if len(u) else 0.0 for u in r.units])
        scored.add(r.group)
        how[r.key] = "first order (output Taylor |Σ y·g|)"


# ------------------------------------------------------------------------------------------
# Updates for a plan
# ------------------------------------------------------------------------------------------
def layer_removals(model: nn.Module, analysis: Any, plan: Any,
                   compensated_rows_only: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (removed matrix rows, removed matrix columns)}`` for every contraction the plan touches.

    ``compensated_rows_only``: list only rows of groups that have no consumer column in any
    contraction (see :func:`plan_update`).
    """
    groups = [analysis.by_id[gid] for gid in plan]
    rows: dict[str, set[int]] = {}
    cols: dict[str, set[int]] = {}
    roles = roles_of(model, groups)
    consumed = {r.group for r in roles if r.contraction is not None and r.contraction.side == "cols"}
    for r in roles:
        if r.contraction is None:
            continue
        if compensated_rows_only and r.contraction.side == "rows" and r.group in consumed:
            continue
        removed = [r.units[u] for u in plan[r.group]]
        idx = r.contraction.matrix_indices(np.concatenate(removed)) if removed else np.zeros(0, np.int64)
        (rows if r.contraction.side == "rows" else cols).setdefault(r.layer, set()).update(idx.tolist())
    layers = set(rows) | set(cols)
    return {n: (np.array(sorted(rows.get(n, ())), dtype=np.int64), np.array(sorted(cols.get(n, ())), dtype=np.int64))
            for n in layers}


def plan_update(model: nn.Module, analysis: Any, plan: Any, source: CurvatureSource, method: str, *,
                damping: float = DAMPING, out: MutableMapping[str, torch.Tensor] | None = None,
                ) -> tuple[MutableMapping[str, torch.Tensor], list[str]]:
    """New values of every weight/bias ``method`` (``"surgeon"``/``"obs"``) changes for ``plan``.

    Returns ``({fqn: tensor of the parameter's shape}, notes)``; ``out`` is the mapping to fill
    (sequential mode passes one that spills to disk).  Tied weights (one tensor used by
    several modules) are left as they are: an update for one use would change the others.

    In a coupled group a unit's producer rows feed only its consumer columns, which go with it;
    the consumers' column update (via ``Ã⁻¹``) already re-creates the lost inputs from the kept
    ones, so also moving the producers' other rows (via ``G̃⁻¹``, which assumes the rest of the
    network still reads the removed rows) would compensate twice.  The row update is therefore
    applied to the rows of groups that no linear consumer compensates (e.g. a channel read only
    by a norm or the model output); with a redundant unit this makes the pruned layer output equal
    the original (tests/test_update.py).
    """
    from fxprune.passes.stats import StatSpec

    removals = layer_removals(model, analysis, plan, compensated_rows_only=method == "surgeon")
    shrink = method == "surgeon" and getattr(source, "shrink", False)
    names = tensor_names(model)
    specs: dict[str, Any] = {}
    notes: list[str] = []
    skipped_tied = []
    for layer, (r, c) in removals.items():
        module = model.get_submodule(layer)
        if len(names.get(id(module.weight), [])) > 1:
            skipped_tied.append(layer)
            continue
        if method == "surgeon" and (len(r) or len(c)):
            specs[layer] = StatSpec(input_cov=True, bias_column=True, grad_cov=bool(len(r)))
        elif method == "obs" and len(c):
            specs[layer] = StatSpec(input_cov=True, bias_column=True)
    if skipped_tied:
        notes.append(f"{method} update: tied weights not updated ({', '.join(sorted(skipped_tied))})")
    changed: MutableMapping[str, torch.Tensor] = out if out is not None else {}

    def chunk(layers: list[str], stats: Any) -> None:
        for layer in layers:
            module = model.get_submodule(layer)
            r, c = removals[layer]
            bias = getattr(module, "bias", None)
            lc = LayerCurvature.of(layer, stats.layers.get(layer), weight_matrix(module), bias,
                                   damping=damping, need_grad=method == "surgeon" and bool(len(r)),
                                   shrink=shrink)
            if method == "surgeon":
                w, b = kfac_update(lc, r, c)
            else:
                w, b = obs_update(lc, c)
            prefix = f"{layer}." if layer else ""
            changed[prefix + "weight"] = write_weight_matrix(module, w).to(module.weight.device)
            if b is not None and isinstance(bias, torch.Tensor):
                changed[prefix + "bias"] = b.to(bias.dtype).to(bias.device).reshape(bias.shape)
            del lc

    source.each_chunk(model, specs, chunk)
    n = len(changed)
    notes.append(f"{method} update: {n} tensors in {len(specs)} layers compensated "
                 f"({source.gatherings} statistics gathering(s))")
    return changed, notes
