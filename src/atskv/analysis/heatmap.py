"""Needle depth x context length heatmaps (tasks whose samples record ``meta.depth``, the
position of the target needle in the context as a fraction, 0 = start): per budget, one panel
per method (the variant the figures show, :func:`atskv.analysis.curves.shown_variants`, and
``full``), the mean score of the samples in each depth bin and context length, one colour scale
(0-100) for all panels; a cell with no sample is blank."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from atskv.analysis.curves import SHOWN_CAPTION, shown_variants  # noqa: E402
from atskv.analysis.intervals import Intervals  # noqa: E402
from atskv.analysis.plots import DPI, MAX_SERIES  # noqa: E402
from atskv.analysis.tables import Cell  # noqa: E402

N_BINS = 5
PER_ROW = 5


def depth_grid(cell_rows: dict[float, list[dict]], ctxs: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(mean score, count) per depth bin (rows, N_BINS equal bins of [0, 1]) and context length
    (columns) from each context length's samples; NaN where a bin has no sample."""
    total = np.zeros((N_BINS, len(ctxs)))
    count = np.zeros((N_BINS, len(ctxs)))
    for j, ctx in enumerate(ctxs):
        for r in cell_rows.get(ctx, []):
            d = (r.get("meta") or {}).get("depth")
            if not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
                continue
            i = min(int(d * N_BINS), N_BINS - 1)
            total[i, j] += float(r["score"])
            count[i, j] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def depth_heatmaps(cells: list[Cell], ivs: Intervals, title: str, stem: str,
                   fig_dir: Path) -> list:
    pick = shown_variants(cells)
    shown = [c for c in cells if pick.get(c.method) == c.variant]

    def rows_of(c: Cell) -> list[dict]:
        return [r for run in c.runs.itertuples(index=False) for r in ivs.samples(run) or []]

    if not any((r.get("meta") or {}).get("depth") is not None for c in shown for r in rows_of(c)):
        return []
    ctxs = sorted({c.ctx for c in shown})
    sizes = sorted({c.size for c in shown if c.size},
                   key=lambda s: (s.startswith("kv"), float(s.lstrip("kv"))))
    out = []
    for size in sizes or [""]:
        panel_cells = [c for c in shown if c.is_full] + [c for c in shown if c.size == size
                                                         and not c.is_full]
        variants = list(dict.fromkeys(c.variant for c in panel_cells))
        for gi in range(0, len(variants), MAX_SERIES):
            chunk = variants[gi:gi + MAX_SERIES]
            cols = min(len(chunk), PER_ROW)
            nrows = -(-len(chunk) // cols)
            fig, axes = plt.subplots(nrows, cols, squeeze=False, sharey=True,
                                     figsize=(cols * (0.9 + 0.55 * len(ctxs)) + 1.2,
                                              nrows * 2.6 + 0.6))
            im = None
            for ax, v in zip(axes.flat, chunk, strict=False):
                grid, count = depth_grid({c.ctx: rows_of(c) for c in panel_cells
                                          if c.variant == v}, ctxs)
                im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap="viridis",
                               aspect="auto", origin="upper")
                for (i, j), val in np.ndenumerate(grid):
                    if np.isfinite(val):
                        ax.text(j, i, f"{val:.0f}", ha="center", va="center", fontsize=7,
                                color="black" if val > 60 else "white")
                ax.set_title(v, fontsize=9)
                ax.set_xticks(range(len(ctxs)))
                ax.set_xticklabels([f"{c:g}" for c in ctxs], fontsize=8)
                ax.set_yticks(range(N_BINS))
                ax.set_yticklabels([f"{100 * i // N_BINS}-{100 * (i + 1) // N_BINS}%"
                                    for i in range(N_BINS)], fontsize=8)
                ax.set_facecolor("white")
            for ax in axes.flat[len(chunk):]:
                ax.set_visible(False)
            for ax in axes[:, 0]:
                ax.set_ylabel("Needle depth")
            for ax in axes[-1, :]:
                ax.set_xlabel("Context length")
            fig.suptitle(f"{title}: score by needle depth and context length"
                         + (f", budget {size}" if size else ""), fontsize=11)
            fig.tight_layout()
            fig.colorbar(im, ax=list(axes.flat[:len(chunk)]), shrink=0.8, pad=0.02,
                         label="mean score (0-100)")
            part = f"_{gi // MAX_SERIES}" if len(variants) > MAX_SERIES else ""
            name = f"{stem}_depth_{size or 'all'}{part}.png".replace("/", "_")
            path = fig_dir / name
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
            plt.close(fig)
            out.append((f"{title}: mean score by the target needle's depth ({N_BINS} bins) and "
                        f"context length{f' at budget {size}' if size else ''}, every task's "
                        f"samples pooled; {SHOWN_CAPTION}; one colour scale; blank: no sample.",
                        path))
    return out
