"""A self-contained HTML report (and its Markdown twin) of one run directory.

The report reads only what the run wrote (config, rows, aggregates, figures, and
``evaluation.json`` when ``vitxai evaluate`` ran); it computes nothing but bootstrap intervals
of per-image columns. Figures are embedded as base64 PNG, so the HTML file can be mailed or
archived alone.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from vitxai.metrics.scores import COST_COLUMNS, MASK_PAIR_SCORES, METHOD_COLUMNS
from vitxai.store import (
    AGGREGATES,
    METHOD_ROWS,
    RunLock,
    atomic_write,
    check_derived,
    finished_run,
    read_evaluation,
    read_json,
    read_rows,
    run_identity,
)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def method_summary(root: Path, names: Sequence[str]) -> dict[str, dict[str, tuple]]:
    """method → column → (mean, ci_low, ci_high, n) over images (bootstrap 95 %)."""
    from vitxai.stats import bootstrap_ci

    rows = read_rows(root, METHOD_ROWS, ("index", "method"))
    out: dict[str, dict[str, tuple]] = {}
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        out[name] = {}
        for column in METHOD_COLUMNS:
            if not mine or column not in mine[0]:
                continue
            values = np.array([float(r[column]) for r in mine], dtype=float)
            mean, low, high = bootstrap_ci(values, seed=0)
            out[name][column] = (mean, low, high, int(np.isfinite(values).sum()))
    return out


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# Markdown's inline syntax (emphasis, code, links, tables, strike-through) and backslash
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")


def _md(text: str) -> str:
    """``text`` as literal Markdown on one line: the twin of ``html.escape`` for report.md,
    so that a method, image or run name cannot break a table or inject HTML."""
    one_line = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_md, r)) + " |" for r in rows]
    return "\n".join(lines)


def _sections(root: Path, config: dict, aggregates: dict, evaluation: dict | None
              ) -> list[tuple[str, str, list, list, list[Path]]]:
    """(title, text, header, rows, figures) per report section."""
    names = aggregates["methods"]
    sub = aggregates["subsets"]["all"]
    figures = root / "figures"
    sections = []
    notes = "; ".join(config.get("notes", []))
    overview = [
        ["model", str(config["model"]["name"])],
        ["dataset", f"{config['dataset'].get('name')} ({config['dataset'].get('type')})"],
        ["images", f"{sub['n_images']} ({aggregates['subsets']['correct']['n_images']} "
                   "correctly classified)"],
        ["skipped (unreadable)", str(len(aggregates.get("skipped", [])))],
        ["methods", ", ".join(names)],
        ["target", str(config["target"])],
        ["seed", str(config["seed"])],
        ["run time", f"{aggregates.get('seconds', float('nan')):.1f} s"],
    ]
    sections.append(("Overview", notes, ["", ""], overview, []))
    samples = sorted(figures.glob("sample_*.png"))
    sections.append(("Sample image", "Signed maps (top, red positive) and unified masks "
                     "(bottom) of every method for one image.", [], [], samples))
    summary = method_summary(root, names)
    columns = [c for c in METHOD_COLUMNS if any(c in summary[n] for n in names)]
    truth_cols = [c for c in columns if c.startswith(("truth_", "other_"))]
    if truth_cols:
        header = ["method"] + [METHOD_COLUMNS[c].label for c in truth_cols]
        rows = [[n] + [f"{_fmt(summary[n][c][0])} [{_fmt(summary[n][c][1])}, "
                       f"{_fmt(summary[n][c][2])}]" for c in truth_cols] for n in names]
        sections.append(("Agreement with the ground truth",
                         "Means over images with bootstrap 95 % intervals. 'mask on object' = "
                         "|M∩T|/|M|, 'object found' = |M∩T|/|T|; 'mass on other object' is "
                         "the share of positive attribution on the other class's object "
                         "(two-object split; lower is better).", header, rows, []))
    else:
        sections.append(("Agreement with the ground truth",
                         f"Skipped: dataset {config['dataset'].get('name')!r} has no "
                         "ground-truth masks (the bundled synthetic benchmark has).",
                         [], [], []))
    for metric, score in MASK_PAIR_SCORES.items():
        label = score.label
        m = sub["pairwise"][metric]
        rows = [[a] + [f"{_fmt(v, 2)} (n={n})" for v, n in zip(row, counts, strict=True)]
                for a, row, counts in zip(names, m["mean"], m["n"], strict=True)]
        heat = figures / f"{metric}_heatmap.png"
        sections.append((f"Agreement between methods: {label}",
                         "Unified binary masks compared per image, then averaged; a pair with "
                         "an empty denominator is undefined and excluded (n = images counted).",
                         ["A \\ B", *names], rows, [heat] if heat.exists() else []))
    if evaluation is not None:
        for title, table in evaluation.get("tables", {}).items():
            sections.append((title, table.get("text", ""), table["header"], table["rows"],
                             [root / f for f in table.get("figures", [])]))
    cost_cols = [c for c in COST_COLUMNS if c in columns]
    sections.append(("Cost", "Model passes per image, wall seconds per image and peak memory "
                     "(CUDA allocation on a GPU; on the CPU the process's peak resident memory "
                     "during the method's call, model included).",
                     ["method"] + [METHOD_COLUMNS[c].label for c in cost_cols],
                     [[n] + [_fmt(summary[n][c][0], 2) for c in cost_cols] for n in names], []))
    sections.append(("Configuration and versions", "",
                     ["key", "value"],
                     [[k, json.dumps(v, default=str)] for k, v in config.items()
                      if k not in ("dataset",)], []))
    return sections


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#f2f2f2}
img{max-width:100%;margin:.5em 0;border:1px solid #eee}td{max-width:600px;word-break:break-all}
"""


# Records on <body> how many figures decoded, so a headless browser can check the rendering
# (scripts/check_report.py); harmless for readers.
_LOAD_PROBE = ("<script>addEventListener('load',()=>{const i=[...document.images];"
               "document.body.dataset.figures=i.length;document.body.dataset.rendered="
               "i.filter(x=>x.complete&&x.naturalWidth>0).length})</script>")


def write_report(root: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` into the run directory.

    Only a finished run is reported, and only with aggregates and evaluation results
    computed from that run (same fingerprint and image count); else a one-line error.
    """
    root = Path(root)
    with RunLock(root):
        return _write_report(root)


def _write_report(root: Path) -> tuple[Path, Path]:
    config, manifest = finished_run(root)
    identity = run_identity(config, manifest)
    aggregates = read_json(root / AGGREGATES)
    check_derived(root, AGGREGATES, aggregates, identity,
                  "rerun the same `vitxai compare` command to refresh it")
    sections = _sections(root, config, aggregates, read_evaluation(root, identity))
    parts = [f"<!doctype html><meta charset='utf-8'><title>vitxai report: "
             f"{html.escape(root.name)}</title><style>{_CSS}</style>{_LOAD_PROBE}",
             f"<h1>vitxai report: {html.escape(root.name)}</h1>"]
    md = [f"# vitxai report: {_md(root.name)}"]
    for title, text, header, rows, figures in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        md.append(f"\n## {_md(title)}\n")
        if text:
            parts.append(f"<p>{html.escape(text)}</p>")
            md.append(_md(text) + "\n")
        if rows:
            parts.append(_table(header, rows))
            md.append(_md_table(header, rows))
        for f in figures:
            if f.exists():
                parts.append(_image(f))
                md.append(f"\n![{_md(f.stem)}]({quote(f.relative_to(root).as_posix())})")
    html_path, md_path = root / "report.html", root / "report.md"
    for path, lines in ((html_path, parts), (md_path, md)):
        text = "\n".join(lines) + "\n"
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return html_path, md_path
