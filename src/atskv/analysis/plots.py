"""Figures for :mod:`atskv.analysis.report` (matplotlib Agg backend, seaborn styling).

Every function writes PNG files and returns ``[(title, path), ...]``. A figure whose data is
all missing is still written, with a "no data" message, so the report never points at a
file that does not exist. Accuracy error bars are the 95% bootstrap intervals over samples
(``accuracy_low`` / ``accuracy_high`` of the report's rows); the other metrics' are the std
over seeds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

DPI = 100
LABEL_FONTSIZE = 7
LABEL_STEP = 10  # points between stacked labels
# (column in the per-run table, y-axis label, file stem)
CONTEXT_METRICS = [
    ("kv_cache_mib", "KV cache (MiB, peak during decode)", "kv_cache_mib"),
    ("peak_memory_mib", "Peak memory (MiB)", "peak_memory_mib"),
    ("ttft_s", "Time to first token (s)", "ttft_s"),
    ("decode_tokens_per_s", "Decode throughput (tokens/s)", "throughput"),
    ("accuracy", "Accuracy", "accuracy"),
]
CROSS_METRICS = [
    ("memory_reduction_pct", "Memory reduction % vs full", "memory_reduction"),
    ("accuracy", "Accuracy", "accuracy"),
    ("decode_tokens_per_s", "Decode throughput (tokens/s)", "throughput"),
]


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no data for {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _palette(labels: list[str]) -> dict[str, tuple]:
    name = "tab10" if len(labels) <= 10 else "husl"
    return dict(zip(labels, sns.color_palette(name, n_colors=max(len(labels), 1)), strict=False))


def _ci_errors(df: pd.DataFrame, col: str) -> np.ndarray | None:
    """(2, n) distances below/above ``col`` to its interval (0 where there is none)."""
    if f"{col}_low" not in df or f"{col}_high" not in df:
        return None
    v = df[col].to_numpy(dtype=float)
    lo = np.nan_to_num(v - df[f"{col}_low"].to_numpy(dtype=float), nan=0.0)
    hi = np.nan_to_num(df[f"{col}_high"].to_numpy(dtype=float) - v, nan=0.0)
    return np.clip(np.vstack([lo, hi]), 0.0, None)


def _accuracy_lines(ax, cells: pd.DataFrame, order: list[str], pal: dict) -> None:
    """Lines with interval bars, each method's points nudged sideways (by a few percent of the
    context length) so that coinciding intervals stay visible."""
    for i, lab in enumerate(order):
        d = cells[cells["method"] == lab].sort_values("context_len")
        x = d["context_len"].to_numpy(dtype=float) * 2.0 ** (0.025 * (i - (len(order) - 1) / 2))
        ax.errorbar(x, d["accuracy"], yerr=_ci_errors(d, "accuracy"), color=pal[lab],
                    marker="o", markersize=4, capsize=3, label=lab)


def context_plots(
    runs: pd.DataFrame, labels: list[str], title: str, slug: str, fig_dir: Path,
    cells: pd.DataFrame | None = None,
) -> list[tuple[str, Path]]:
    """One line per method against context length; error bars are the std over seeds, for
    accuracy the 95% bootstrap interval of ``cells`` (the per-context rows) where given."""
    out = []
    ctxs = sorted(runs["context_len"].dropna().unique())
    pal = _palette(labels)
    for col, ylabel, stem in CONTEXT_METRICS:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        data = runs[["label", "context_len", col]].dropna()
        use_cells = (col == "accuracy" and cells is not None and not cells.empty
                     and cells["accuracy"].notna().any())
        if data.empty:
            _no_data(ax, ylabel)
        else:
            order = [lab for lab in labels if lab in set(data["label"])]
            if use_cells:
                _accuracy_lines(ax, cells.dropna(subset=["accuracy"]), order, pal)
            else:
                sns.lineplot(
                    data=data, x="context_len", y=col, hue="label", hue_order=order,
                    palette={k: pal[k] for k in order}, marker="o", errorbar="sd",
                    err_style="bars", ax=ax,
                )
            if len(ctxs) > 1 and ctxs[-1] / max(ctxs[0], 1) >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(ctxs)
            ax.set_xticklabels([str(int(c)) for c in ctxs])
            ax.minorticks_off()
            ax.set_xlabel("Context length (tokens)")
            ax.set_ylabel(ylabel + (" (error bars: 95% bootstrap CI)" if use_cells else ""))
            ax.legend(title="Method", fontsize=8)
        ax.set_title(f"{title}: {ylabel}")
        out.append((f"{title}: {ylabel} vs context length", _save(fig, fig_dir / f"{slug}_{stem}.png")))
    return out


def _offsets(k: int) -> tuple[float, float]:
    """The k-th candidate label offset (points): right of the point, then alternately above
    and below it in steps of one label line."""
    if k == 0:
        return (4.0, 4.0)
    step = (k + 1) // 2 * LABEL_STEP
    return (6.0, 4.0 + step) if k % 2 else (6.0, 4.0 - step)


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: float = LABEL_FONTSIZE,
                 max_tries: int = 40) -> list:
    """Annotate each (x, y, text) so that no two labels overlap: labels are placed in a fixed
    order (by position, then text), each at the first candidate offset whose rendered box
    overlaps no label placed before it; a displaced label gets a thin leader line to its
    point. Deterministic. Returns the text annotations (in ``points`` order)."""
    fig = ax.figure
    fig.canvas.draw()  # limits and transforms as they will be saved
    renderer = fig.canvas.get_renderer()
    placed, out = [], [None] * len(points)
    for i in sorted(range(len(points)), key=lambda j: (points[j][0], points[j][1], points[j][2])):
        x, y, text = points[i]
        for k in range(max_tries):
            off = _offsets(k)
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=off,
                              fontsize=fontsize, va="bottom")
            box = ann.get_window_extent(renderer).expanded(1.0, 1.05)
            if not any(box.overlaps(b) for b in placed) or k == max_tries - 1:
                break
            ann.remove()
        if k:
            ax.annotate("", (x, y), textcoords="offset points", xytext=(off[0], off[1] + 3),
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4",
                                    "shrinkA": 0, "shrinkB": 2})
        placed.append(box)
        out[i] = ann
    return out


def cross_plots(summary: pd.DataFrame, labels: list[str], fig_dir: Path) -> list[tuple[str, Path]]:
    """Bar charts per benchmark and the accuracy vs memory-reduction scatter."""
    out = []
    sections = list(dict.fromkeys(summary["section"]))
    pal = _palette(labels)
    for col, ylabel, stem in CROSS_METRICS:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sections) + 3), 4.5))
        data = summary[["section", "method", col]].dropna()
        if data.empty:
            _no_data(ax, ylabel)
        else:
            order = [lab for lab in labels if lab in set(data["method"])]
            sns.barplot(
                data=data, x="section", y=col, hue="method", order=sections, hue_order=order,
                palette={k: pal[k] for k in order}, errorbar=None, ax=ax,
            )
            for cont in ax.containers:
                ax.bar_label(cont, fmt="%.1f", fontsize=6, rotation=90 if len(order) > 4 else 0,
                             padding=2)
            ax.margins(y=0.12)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xlabel("Benchmark")
            ax.set_ylabel(ylabel)
            ax.legend(title="Method", fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.set_title(f"{ylabel} by benchmark\n(averaged over context lengths)")
        out.append((f"{ylabel} by benchmark", _save(fig, fig_dir / f"all_{stem}.png")))

    fig, ax = plt.subplots(figsize=(8, 5.5))
    cols = [c for c in ("accuracy_low", "accuracy_high") if c in summary]
    data = summary[["section", "method", "memory_reduction_pct", "accuracy"] + cols].dropna(
        subset=["memory_reduction_pct", "accuracy"])
    if data.empty:
        _no_data(ax, "accuracy vs memory reduction")
    else:
        markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
        mk = {s: markers[i % len(markers)] for i, s in enumerate(sections)}
        err = _ci_errors(data, "accuracy")
        for i, row in enumerate(data.itertuples(index=False)):
            color = pal.get(row.method, "gray")
            if err is not None and err[:, i].any():
                ax.errorbar(row.memory_reduction_pct, row.accuracy, yerr=err[:, i:i + 1],
                            color=color, capsize=3, linewidth=1, zorder=1)
            ax.scatter(row.memory_reduction_pct, row.accuracy, color=color,
                       marker=mk[row.section], s=60, edgecolor="black", linewidth=0.5, zorder=2)
        for s in sections:  # legend for the benchmark markers
            ax.scatter([], [], marker=mk[s], color="gray", label=s)
        ax.legend(title="Benchmark", fontsize=8)
        xs = data["memory_reduction_pct"].to_numpy(dtype=float)
        ax.set_xlim(min(0.0, np.nanmin(xs)) - 5, max(100.0, np.nanmax(xs)) + 5)
        ax.set_xlabel("Memory reduction % vs full (higher = smaller KV cache)")
        ax.set_ylabel("Accuracy (error bars: 95% bootstrap CI)")
        place_labels(ax, list(zip(data["memory_reduction_pct"], data["accuracy"],
                                  data["method"], strict=True)))
    ax.set_title("Performance vs efficiency\n(one point per method and benchmark; marker = benchmark)")
    out.append(("Accuracy vs memory reduction", _save(fig, fig_dir / "all_accuracy_vs_memory.png")))
    return out
