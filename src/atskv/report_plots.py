"""Figures for :mod:`atskv.report` (matplotlib Agg backend, seaborn styling).

Every function writes PNG files and returns ``[(title, path), ...]``. A figure whose data is
all missing is still written, with a "no data" message, so the report never points at a
file that does not exist.
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


def context_plots(
    runs: pd.DataFrame, labels: list[str], title: str, slug: str, fig_dir: Path
) -> list[tuple[str, Path]]:
    """One line per method against context length; error bars are the std over seeds."""
    out = []
    ctxs = sorted(runs["context_len"].dropna().unique())
    pal = _palette(labels)
    for col, ylabel, stem in CONTEXT_METRICS:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        data = runs[["label", "context_len", col]].dropna()
        if data.empty:
            _no_data(ax, ylabel)
        else:
            order = [lab for lab in labels if lab in set(data["label"])]
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
            ax.set_ylabel(ylabel)
            ax.legend(title="Method", fontsize=8)
        ax.set_title(f"{title}: {ylabel}")
        out.append((f"{title}: {ylabel} vs context length", _save(fig, fig_dir / f"{slug}_{stem}.png")))
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
    data = summary[["section", "method", "memory_reduction_pct", "accuracy"]].dropna()
    if data.empty:
        _no_data(ax, "accuracy vs memory reduction")
    else:
        markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
        mk = {s: markers[i % len(markers)] for i, s in enumerate(sections)}
        for row in data.itertuples(index=False):
            ax.scatter(row.memory_reduction_pct, row.accuracy, color=pal.get(row.method, "gray"),
                       marker=mk[row.section], s=60, edgecolor="black", linewidth=0.5)
            ax.annotate(row.method, (row.memory_reduction_pct, row.accuracy),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        for s in sections:  # legend for the benchmark markers
            ax.scatter([], [], marker=mk[s], color="gray", label=s)
        ax.legend(title="Benchmark", fontsize=8)
        xs = data["memory_reduction_pct"].to_numpy(dtype=float)
        ax.set_xlim(min(0.0, np.nanmin(xs)) - 5, max(100.0, np.nanmax(xs)) + 5)
        ax.set_xlabel("Memory reduction % vs full (higher = smaller KV cache)")
        ax.set_ylabel("Accuracy")
    ax.set_title("Performance vs efficiency\n(one point per method and benchmark; marker = benchmark)")
    out.append(("Accuracy vs memory reduction", _save(fig, fig_dir / "all_accuracy_vs_memory.png")))
    return out
