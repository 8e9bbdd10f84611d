"""The chart of a canary's sequential analysis: per metric, the running estimate of ``candidate - champion`` and
its confidence sequence over the samples, with 0 (above it: rolled back) and the minimal difference (below it:
promoted) drawn in. matplotlib on the Agg backend: no display needed."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any


def sequence_png(
    trajectory: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[Mapping[str, Any]], *, title: str = ""
) -> bytes:
    """A PNG with one panel per metric (``trajectory``: the analysis's looks; ``metrics``: its rows)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = {m["metric"]: m for m in metrics}
    names = [n for n in trajectory if n in rows] or list(rows)
    fig = Figure(figsize=(7, 2.6 * max(1, len(names))), dpi=100)
    axes = fig.subplots(max(1, len(names)), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=False):
        points = [p for p in trajectory.get(name, []) if p.get("n")]
        n = [p["n"] for p in points]
        est = [p["estimate"] for p in points]
        finite = [(x, p["low"], p["high"]) for x, p in zip(n, points, strict=True) if p.get("low") is not None]
        if finite:
            xs, lows, highs = zip(*finite, strict=True)
            ax.fill_between(xs, lows, highs, alpha=0.25, label="confidence sequence")
        ax.plot(n, est, label="estimate (candidate - champion)")
        ax.axhline(0.0, color="black", linewidth=0.8)
        md = rows[name].get("min_difference")
        if md is not None:
            ax.axhline(md, color="tab:green", linestyle="--", linewidth=0.8, label=f"min difference {md:g}")
        if est:
            spread = max(abs(v) for v in est) or 1.0
            ax.set_ylim(-3 * max(spread, md or 0.0), 3 * max(spread, md or 0.0))
        ax.set_title(f"{name}: {rows[name].get('decision', '')}", fontsize=9)
        ax.set_xlabel("samples", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
