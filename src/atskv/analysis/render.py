"""Rendering of :mod:`atskv.analysis.report` blocks: Markdown, self-contained HTML, and W&B tables."""

from __future__ import annotations

import base64
import html
import os
import re
import warnings
from pathlib import Path

import pandas as pd


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_md(blocks: list) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "note":
            out.append(f"> **Note:** {b[1]}")
        elif b[0] == "caption":
            out.append(b[1])
        elif b[0] == "list":
            out.append("\n".join(f"- {_md_cell(i)}" for i in b[1]))
        elif b[0] == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |",
                     "|" + "|".join("---" for _ in b[1]) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b[2]]
            out.append("\n".join(lines))
        elif b[0] == "img":  # the caption under the figure, not only in its alt text
            out.append(f"![{_md_cell(b[2].split(';')[0])}]({b[1]})\n\n{b[2]}")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list, base: Path) -> str:
    out = []

    def e(x) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(x)))

    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "note":
            out.append(f'<p class="note"><b>Note:</b> {e(b[1])}</p>')
        elif b[0] == "caption":
            out.append(f'<p class="caption">{e(b[1])}</p>')
        elif b[0] == "list":
            out.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>"
                           for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode((base / b[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
             "padding:2px 6px;text-align:right}td{white-space:nowrap}"
             "td:first-child,th:first-child{text-align:left}"
             ".note{background:#fff4d6;border-left:4px solid #e0a800;padding:4px 8px}"
             "img{max-width:100%}.caption{color:#444;font-size:0.85em;max-width:1100px;"
             "margin-top:-0.5em}figcaption{color:#444;font-size:0.85em}"
             "td,th{font-size:0.9em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>atskv report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def log_to_wandb(tables: dict[str, pd.DataFrame], figures: list[Path]) -> bool:
    """Log tables and figures to a W&B run; any failure only warns."""
    try:
        import wandb

        run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), project="atskv",
                         job_type="report")
        try:
            for name, df in tables.items():
                run.log({name: wandb.Table(dataframe=df.astype(str))})
            run.log({f"figures/{f.stem}": wandb.Image(str(f)) for f in figures})
        finally:
            run.finish()
        return True
    except Exception as exc:  # noqa: BLE001 - reporting must not fail because of W&B
        warnings.warn(f"W&B logging failed, report files are still written: {exc}", stacklevel=2)
        return False
