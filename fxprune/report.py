"""Human-facing views: the group table, and prune/recover/bench reports with plots."""

from __future__ import annotations

import os
from typing import Any

from fxprune.util.names import block_index as _block_index
from fxprune.util.publish import atomic_write_text as _atomic_write


def group_table(analysis: Any, max_rows: int | None = 60) -> str:
    """One row per group (id, kind, units, exact, members, what it shrinks) and a footer."""
    groups = list(analysis.groups)
    rows = [("id", "kind", "units", "exact", "members", "shrinks")]
    for g in groups[: max_rows or None]:
        params = g.param_names
        shrink = ", ".join(p.rsplit(".", 2)[-2] if p.count(".") >= 1 else p for p in params[:4])
        if len(params) > 4:
            shrink += f", +{len(params) - 4}"
        rows.append((g.id, g.kind, str(g.size), "yes" if g.exact else "no", str(len(g.members)), shrink))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if max_rows and len(groups) > max_rows:
        lines.append(f"... {len(groups) - max_rows} more groups")
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    lines.append(
        f"{len(groups)} groups ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
        f"{sum(g.exact for g in groups)} exact; {len(analysis.frozen)} frozen spaces; "
        f"{len(analysis.unsupported)} ops without a rule"
    )
    branches = getattr(analysis, "branches", ())
    if branches:
        removable = [b for b in branches if b.removable]
        lines.append(f"{len(branches)} residual branches, {len(removable)} removable as units of group 'blocks' "
                     f"({sum(b.exact for b in removable)} exact): " + ", ".join(b.id for b in removable[:8])
                     + (f", +{len(removable) - 8}" if len(removable) > 8 else ""))
        for b in [b for b in branches if not b.removable][:5]:
            lines.append(f"  frozen branch {b.id}: {b.frozen}")
    for u in analysis.unsupported[:10]:
        lines.append(f"  unsupported: {u}")
    if analysis.unsupported or analysis.frozen:
        lines.append("  ask why a parameter is frozen: fxprune explain MODEL PARAM (or Analysis.explain)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Prune / recover / bench reports: report.md + report.html + PNG plots
# ------------------------------------------------------------------------------------------
def plot_kept_per_layer(report: Any, path: str) -> str | None:
    """Kept fraction per layer, one line per group kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for kind, by_block in report.kept_by_kind_and_block.items():
        pts = sorted((_block_index(b), v) for b, v in by_block.items() if _block_index(b) >= 0)
        if pts:
            series[kind] = pts
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for kind, pts in sorted(series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=kind)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Kept fraction per layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_score_distributions(report: Any, path: str) -> str | None:
    """Normalised unit scores per group kind; removed units in red, the cut line dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds: dict[str, tuple[list[float], list[float]]] = {}
    for g in report.groups:
        if not g["scores"]:
            continue
        removed = set(g["removed_units"])
        kept_s, rem_s = kinds.setdefault(g["kind"], ([], []))
        for u, s in enumerate(g["scores"]):
            (rem_s if u in removed else kept_s).append(s)
    kinds = {k: v for k, v in kinds.items() if v[0] or v[1]}
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.2), dpi=110, squeeze=False)
    for ax, (kind, (kept_s, rem_s)) in zip(axes[0], sorted(kinds.items())):
        allv = np.array(kept_s + rem_s)
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        ax.hist(kept_s, bins=bins, color="tab:blue", alpha=0.7, label="kept")
        if rem_s:
            ax.hist(rem_s, bins=bins, color="tab:red", alpha=0.7, label="removed")
            ax.axvline(max(rem_s), color="k", linestyle="--", linewidth=1, label="cut")
        ax.set_title(kind)
        ax.set_xlabel("normalised score")
        ax.legend(fontsize=7)
    fig.suptitle("Unit scores per group kind")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out_dir: str, title: str, headline: list[tuple[str, ...]], *, prune_report: Any = None,
                 sections: dict[str, str] | None = None) -> dict[str, str]:
    """Write report.md, report.html and plots into ``out_dir``; return their paths.

    ``headline`` is a table (first row = header) of the before/after numbers the terminal also
    prints; ``prune_report`` (a ``PruneReport``) adds the per-layer and score plots.
    """
    import html as _html

    os.makedirs(out_dir, exist_ok=True)
    plots: list[tuple[str, str]] = []
    if prune_report is not None:
        for fn, name, caption in (
            (plot_kept_per_layer, "kept_per_layer.png", "Kept fraction per layer, per group kind"),
            (plot_score_distributions, "score_distribution.png", "Score distribution per kind with the cut line"),
        ):
            p = fn(prune_report, os.path.join(out_dir, name))
            if p:
                plots.append((name, caption))
    md = [f"# {title}", "", _md_table(headline), ""]
    for name, caption in plots:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    for head, body in (sections or {}).items():
        md += [f"## {head}", "", body, ""]
    _atomic_write(os.path.join(out_dir, "report.md"), "\n".join(md))
    rows = "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{_html.escape(str(c))}</{'th' if i == 0 else 'td'}>" for c in r) + "</tr>"
        for i, r in enumerate(headline)
    )
    body = [f"<h1>{_html.escape(title)}</h1>", f"<table>{rows}</table>"]
    for name, caption in plots:
        body.append(f"<figure><img src='{name}' alt='{_html.escape(caption)}'><figcaption>{_html.escape(caption)}</figcaption></figure>")
    for head, text in (sections or {}).items():
        body.append(f"<h2>{_html.escape(head)}</h2><pre>{_html.escape(text)}</pre>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + _html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style></head><body>"
        + "\n".join(body) + "</body></html>"
    )
    _atomic_write(os.path.join(out_dir, "report.html"), page)
    out = {"markdown": os.path.join(out_dir, "report.md"), "html": os.path.join(out_dir, "report.html")}
    out.update({name: os.path.join(out_dir, name) for name, _ in plots})
    return out


def _md_table(rows: list[tuple[str, ...]]) -> str:
    if not rows:
        return ""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Model card (README.md of a pruned checkpoint)
# ------------------------------------------------------------------------------------------
_PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForMaskedLM": "fill-mask",
                  "AutoModelForSequenceClassification": "text-classification",
                  "AutoModelForTokenClassification": "token-classification",
                  "AutoModelForImageClassification": "image-classification"}


def model_card(model: Any, checkpoint: Any, *, report: Any = None, source: str | None = None,
               quality: dict | None = None, plan_info: dict | None = None) -> str:
    """The README.md of a pruned checkpoint: what was pruned, how, measured quality, how to load.

    ``checkpoint`` is the :class:`fxprune.checkpoint.Checkpoint` written; ``report`` the
    ``PruneReport`` (without it the card lists the model's size only).
    """
    from fxprune.api import LOADS_WITH_TEXT
    from fxprune.util.modules import count_params

    name = os.path.basename(os.path.normpath(source)) if source else type(model).__name__
    library = "sentence-transformers" if checkpoint.sentence_transformers else (
        "transformers" if checkpoint.loads_with != "fxprune" else "fxprune")
    front = ["---", f"library_name: {library}", "tags:", "- fxprune", "- pruned", "- structured-pruning"]
    tag = next((_PIPELINE_TAGS[a] for a in checkpoint.auto_classes if a in _PIPELINE_TAGS), None)
    if checkpoint.sentence_transformers:
        tag = "sentence-similarity"
    if tag:
        front.append(f"pipeline_tag: {tag}")
    front.append("---")
    md = front + [""]
    if report is not None:
        md += [f"# {name}, pruned by fxprune (-{report.ratio_achieved:.1%} parameters)", ""]
    else:
        md += [f"# {name}, pruned by fxprune", ""]
    md += [f"Structured pruning removed whole units (MLP channels, attention heads) of {type(model).__name__}"
           + (f" from `{source}`" if source else "") + "; the result is a smaller dense model, no sparse kernels needed.", ""]
    md += ["## How to load", "", LOADS_WITH_TEXT[checkpoint.loads_with] + ".", "", "```python",
           checkpoint.how_to_load("path/to/this/directory"), "```", ""]
    md += ["## What was pruned", ""]
    if report is not None:
        md += [_md_table(report.headline()), ""]
        md += _kept_sizes(report)
    else:
        md += [f"{count_params(model):,} parameters.", ""]
    md += ["## How", ""]
    if report is not None:
        md.append(f"- importance criterion: `{report.importance}`; allocation: `{report.allocation}`"
                  + (f" (plan: `{plan_info.get('allocation')}`)" if plan_info and plan_info.get("allocation") != report.allocation else ""))
        md.append(f"- kept sizes rounded to multiples of: `{report.round_to}` (units per kind)")
        md += [f"- note: {n}" for n in report.notes]
    md += ["- library: fxprune (exact structured pruning over torch.export graphs)", ""]
    md += ["## Quality", ""]
    if report is not None:
        md.append(f"- verification: {report.verification}")
    if quality:
        if quality.get("metric") == "perplexity":
            md.append(f"- perplexity on {quality['batches']} calibration batches ({quality['tokens']:,} tokens): "
                      f"dense {quality['dense']:.3f}, pruned {quality['pruned']:.3f} "
                      f"({quality['pruned'] / quality['dense']:.2f}x)")
        else:
            md.append(f"- {quality['metric']} on {quality['batches']} calibration batches: {quality['pruned']:.4f}")
    else:
        md.append("- not measured on text: run `fxprune eval DIR --data FILE` (perplexity / embedding similarity); "
                  "pruning without recovery loses quality, `fxprune recover` fine-tunes it back")
    md.append("")
    if checkpoint.copied:
        md += ["## Files carried over from the source", "", ", ".join(f"`{c}`" for c in checkpoint.copied), ""]
    md += [f"- note: {n}" for n in checkpoint.notes]
    return "\n".join(md).rstrip() + "\n"


def _kept_sizes(report: Any) -> list[str]:
    """Per kind: the kept units per layer (one number when uniform)."""
    by_kind: dict[str, list[tuple[int, int]]] = {}
    for g in report.groups:
        if g.get("block") is not None:
            by_kind.setdefault(g["kind"], []).append((g["units"] - g["removed"], g["units"]))
    rows = [("kind", "units per layer (before)", "kept per layer")]
    for kind, sizes in sorted(by_kind.items()):
        kept = sorted({k for k, _ in sizes})
        before = sorted({u for _, u in sizes})
        if kept == before:
            continue
        rows.append((kind, "/".join(map(str, before)), str(kept[0]) if len(kept) == 1 else f"{kept[0]}-{kept[-1]} (per layer)"))
    return [_md_table(rows), ""] if len(rows) > 1 else []
