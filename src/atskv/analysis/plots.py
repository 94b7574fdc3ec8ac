"""Figures of one report section (matplotlib Agg backend), drawn from its cells
(:mod:`atskv.analysis.tables`): one variant per method (:func:`atskv.analysis.curves.shown_variants`),
at most :data:`MAX_SERIES` series per panel (more methods are split over several figures),
legends outside the data, one colour per method in every figure (``full`` in black).

* :func:`budget_curves`: accuracy against budget, one panel per context length, 95% bootstrap
  bands (cells with at least ``stats.MIN_N`` samples), ``full`` as a horizontal line;
* :func:`pareto`: accuracy against KV cache MiB, one panel per context length, one labelled
  point per method (a line through its budgets), the Pareto frontier dashed;
* :func:`context_curves`: accuracy against context length, one panel per budget (only with two
  or more context lengths).

Each function returns ``[(caption, path), ...]`` and writes nothing when it has nothing to show.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from atskv.analysis import stats  # noqa: E402
from atskv.analysis.curves import SHOWN_CAPTION, fraction_cells, shown_variants  # noqa: E402
from atskv.analysis.data import FULL, method_order  # noqa: E402
from atskv.analysis.tables import Cell  # noqa: E402

DPI = 110
MAX_SERIES = 10  # lines per panel, full's reference line included
PANEL = (4.3, 3.4)  # inches per panel
LABEL_FONTSIZE = 7.5
LABEL_STEP = 10  # points between stacked labels
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]


def colours(methods: list[str]) -> dict[str, tuple]:
    """One colour per method (registry order; ``full`` black)."""
    cmap = plt.get_cmap("tab10")
    rest = [m for m in method_order() if m != FULL] + sorted(set(methods) - set(method_order()))
    out = {m: cmap(i % 10) for i, m in enumerate(rest)}
    out[FULL] = (0.0, 0.0, 0.0, 1.0)
    return out


def _dark(rgba: tuple) -> tuple:
    """A label's colour: its method's, darkened for text on white."""
    return tuple(0.75 * c for c in rgba[:3]) + (1.0,)


def marker(method: str) -> str:
    """One marker per method (registry order), the same in every figure."""
    order = method_order()
    return MARKERS[(order.index(method) if method in order else len(order)) % len(MARKERS)]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _groups(methods: list[str], reserved: int = 1) -> list[list[str]]:
    """The methods (full excluded) in chunks of at most MAX_SERIES - ``reserved`` (full's
    line, the frontier)."""
    rest = [m for m in methods if m != FULL]
    k = MAX_SERIES - reserved
    return [rest[i:i + k] for i in range(0, len(rest), k)] or [[]]


def _panels(n: int, extra_w: float = 2.2, panel: tuple[float, float] = PANEL):
    cols = min(n, 3 if panel[0] < 5 else 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols + extra_w, panel[1] * rows),
                             squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _legend(fig, axes) -> None:
    handles, names = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                names.append(lab)
    if names:
        fig.legend([handles[n] for n in names], names, loc="center left",
                   bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()


def _log_x(ax, xs: list[float], ratio: float = 4.0) -> None:
    xs = sorted(set(xs))
    if len(xs) > 1 and xs[-1] / xs[0] >= ratio:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()


def _shown(cells: list[Cell]) -> tuple[list[Cell], list[str]]:
    pick = shown_variants(cells)
    shown = [c for c in cells if pick.get(c.method) == c.variant]
    return shown, list(dict.fromkeys(c.method for c in shown))


def variants_text(shown: list[Cell]) -> str:
    """Which variant each method's label stands for, grouped by preset."""
    by: dict[str, list[str]] = {}
    for c in shown:
        if not c.is_full:
            by.setdefault(c.preset, [])
            if c.method not in by[c.preset]:
                by[c.preset].append(c.method)
    return "; ".join(f"{p}: {', '.join(ms)}" for p, ms in by.items())


def _band(c: Cell) -> tuple[float, float]:
    if c.ci is None or not stats.testable(c.n):
        return np.nan, np.nan
    return c.ci.low, c.ci.high


def budget_curves(cells: list[Cell], title: str, stem: str, fig_dir: Path) -> list:
    shown, methods = _shown(cells)
    frac = fraction_cells(shown)
    if len({c.budget for c in frac}) < 2:
        return []
    ctxs = sorted({c.ctx for c in frac})
    col, out = colours(methods), []
    for gi, group in enumerate(_groups(methods)):
        fig, axes = _panels(len(ctxs))
        for ax, ctx in zip(axes, ctxs, strict=True):
            full = next((c for c in shown if c.is_full and c.ctx == ctx), None)
            if full is not None and np.isfinite(full.acc):
                ax.axhline(full.acc, color=col[FULL], lw=1.2, ls="--", label=full.variant)
                lo, hi = _band(full)
                if np.isfinite(lo):
                    ax.axhspan(lo, hi, color="0.5", alpha=0.12, lw=0)
            for m in group:
                pts = sorted((c for c in frac if c.method == m and c.ctx == ctx),
                             key=lambda c: c.budget)
                if not pts:
                    continue
                x = [c.budget for c in pts]
                ax.plot(x, [c.acc for c in pts], marker=marker(m), ms=4, lw=1.4,
                        color=col[m], label=pts[0].variant)
                lo, hi = zip(*(_band(c) for c in pts))
                ax.fill_between(x, lo, hi, color=col[m], alpha=0.09, lw=0)
            _log_x(ax, [c.budget for c in frac if c.ctx == ctx])
            ax.set_title(f"context {ctx:g}", fontsize=10)
            ax.set_xlabel("Budget (fraction of the prompt's KV kept)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("Accuracy (0-100)")
        fig.suptitle(f"{title}: accuracy vs budget", fontsize=11)
        _legend(fig, axes)
        part = f" (methods {gi + 1})" if len(_groups(methods)) > 1 else ""
        out.append((f"{title}: accuracy vs budget{part}, one panel per context length; "
                    f"{SHOWN_CAPTION}; bands: 95% bootstrap intervals (cells with at least "
                    f"{stats.MIN_N} samples); dashed: full cache.",
                    _save(fig, fig_dir / f"{stem}_budget_curves{gi or ''}.png")))
    return out


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier (less memory, higher accuracy): points no other point beats on both,
    by memory ascending."""
    best, out = -np.inf, []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def pareto(cells: list[Cell], title: str, stem: str, fig_dir: Path) -> list:
    shown, methods = _shown(cells)
    shown = [c for c in shown if np.isfinite(c.acc) and np.isfinite(c.runs["kv_cache_mib"].mean())]
    if not shown:
        return []
    methods = [m for m in methods if any(c.method == m for c in shown)]
    ctxs = sorted({c.ctx for c in shown})
    budgets = sorted({c.size for c in shown if c.size})
    mk = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(budgets)}
    col, groups, out = colours(methods), _groups(methods, reserved=2), []
    for gi, group in enumerate(groups):
        fig, axes = _panels(len(ctxs), extra_w=1.6, panel=(5.6, 4.4))
        for ax, ctx in zip(axes, ctxs, strict=True):
            here = [c for c in shown if c.ctx == ctx]
            pts, labels = [], []
            for m in [FULL] + group:
                mine = sorted((c for c in here if c.method == m), key=lambda c: c.budget)
                if not mine:
                    continue
                xy = [(c.runs["kv_cache_mib"].mean(), c.acc) for c in mine]
                ax.plot(*zip(*xy, strict=True), color=col[m], lw=0.8, alpha=0.6)
                for c, (x, y) in zip(mine, xy, strict=True):
                    ax.scatter(x, y, color=col[m], s=70 if c.is_full else 34, zorder=3,
                               marker="*" if c.is_full else mk[c.size], edgecolor="black",
                               linewidth=0.4)
                labels.append((*xy[-1], m))  # the largest budget's point
            # the frontier over every method of the panel, also those in another figure
            pts = [(c.runs["kv_cache_mib"].mean(), c.acc) for c in here]
            ax.plot(*zip(*frontier(pts), strict=True), color="0.3", ls="--", lw=1,
                    drawstyle="steps-post", zorder=1, label="Pareto frontier")
            xs = [p[0] for p in pts]
            if max(xs) / max(min(xs), 1e-9) >= 8:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.margins(x=0.15, y=0.12)
            place_labels(ax, labels, colors={m: _dark(col[m]) for m in col})
            ax.set_title(f"context {ctx:g}", fontsize=10)
            ax.set_xlabel("KV cache (MiB, measured)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("Accuracy (0-100)")
        for b in budgets:
            axes[0].scatter([], [], marker=mk[b], color="0.5", label=f"budget {b}")
        axes[0].scatter([], [], marker="*", s=70, color="black", label="full cache")
        fig.suptitle(f"{title}: accuracy vs KV memory", fontsize=11)
        _legend(fig, axes)
        part = f" (methods {gi + 1})" if len(groups) > 1 else ""
        out.append((f"{title}: accuracy vs measured KV cache{part}, one panel per context "
                    f"length; {SHOWN_CAPTION}: {variants_text(shown)}. A line joins a method's "
                    "budgets and its label sits at its largest budget; dashed: the Pareto "
                    "frontier of every method (no other point has less memory and higher "
                    "accuracy). Intervals are in the tables.",
                    _save(fig, fig_dir / f"{stem}_pareto{gi or ''}.png")))
    return out


def context_curves(cells: list[Cell], title: str, stem: str, fig_dir: Path) -> list:
    shown, methods = _shown(cells)
    ctxs = sorted({c.ctx for c in shown})
    if len(ctxs) < 2:
        return []
    sizes = sorted({c.size for c in shown if c.size},
                   key=lambda s: (s.startswith("kv"), float(s.lstrip("kv"))))
    col, out = colours(methods), []
    for gi, group in enumerate(_groups(methods)):
        fig, axes = _panels(max(len(sizes), 1))
        for ax, size in zip(axes, sizes or [""], strict=True):
            for m in [FULL] + group:
                pts = sorted((c for c in shown if c.method == m and (c.size == size or c.is_full)),
                             key=lambda c: c.ctx)
                if not pts:
                    continue
                x = [c.ctx for c in pts]
                ax.plot(x, [c.acc for c in pts], marker=marker(m), ms=4,
                        color=col[m], lw=1.4, ls="--" if m == FULL else "-",
                        label=pts[0].variant)
                lo, hi = zip(*(_band(c) for c in pts))
                ax.fill_between(x, lo, hi, color=col[m], alpha=0.08, lw=0)
            _log_x(ax, ctxs)
            ax.set_title(f"budget {size}" if size else "", fontsize=10)
            ax.set_xlabel("Context length (tokens)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("Accuracy (0-100)")
        fig.suptitle(f"{title}: accuracy vs context length", fontsize=11)
        _legend(fig, axes)
        part = f" (methods {gi + 1})" if len(_groups(methods)) > 1 else ""
        out.append((f"{title}: accuracy vs context length{part}, one panel per budget; "
                    f"{SHOWN_CAPTION}; bands: 95% bootstrap intervals.",
                    _save(fig, fig_dir / f"{stem}_context{gi or ''}.png")))
    return out


def _offsets(k: int) -> tuple[float, float, str]:
    """The k-th candidate label position (offset in points, alignment): right of the point,
    left of it, then alternately above and below on either side in steps of one label line."""
    side = (5.0, "left") if k % 2 == 0 else (-5.0, "right")
    j = k // 2
    step = (j + 1) // 2 * LABEL_STEP
    return side[0], (2.0 + step if j % 2 else 2.0 - step) if j else 2.0, side[1]


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: float = LABEL_FONTSIZE,
                 max_tries: int = 40, colors: dict | None = None) -> list:
    """Annotate each (x, y, text) so that no two labels overlap: labels are placed in a fixed
    order (by position, then text), each at the first candidate position (:func:`_offsets`)
    whose rendered box overlaps no label placed before it; a label moved off its point's line
    gets a thin leader line to it. Deterministic. Returns the text annotations (in ``points``
    order). ``colors``: text -> its colour (default black)."""
    fig = ax.figure
    fig.canvas.draw()  # limits and transforms as they will be saved
    renderer = fig.canvas.get_renderer()
    placed, out = [], [None] * len(points)
    for i in sorted(range(len(points)), key=lambda j: (points[j][0], points[j][1], points[j][2])):
        x, y, text = points[i]
        for k in range(max_tries):
            dx, dy, ha = _offsets(k)
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                              fontsize=fontsize, va="bottom", ha=ha,
                              color=(colors or {}).get(text, "black"), zorder=2.5,
                              bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none",
                                    "alpha": 0.75})
            box = ann.get_window_extent(renderer).padded(3)
            if not any(box.overlaps(b) for b in placed) or k == max_tries - 1:
                break
            ann.remove()
        if k > 1:
            ax.annotate("", (x, y), textcoords="offset points", xytext=(dx, dy + 3),
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4",
                                    "shrinkA": 0, "shrinkB": 2})
        placed.append(box)
        out[i] = ann
    return out
