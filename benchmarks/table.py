#!/usr/bin/env python3
"""Markdown tables from the benchmark's JSON results (what benchmarks/README.md shows).

    python benchmarks/table.py benchmarks/results/bundled-fp32.json ...   # default: all
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _num(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _machine(r: dict[str, Any]) -> str:
    m = r["machine"]
    bf16 = "native bf16" if m.get("cpu_native_bf16") else "bf16 emulated"
    device = m.get("gpu") or f"{m.get('cpu')} ({m.get('cpus_usable')} cores, {bf16})"
    return (f"{device}, torch {m['versions'].get('torch')} with {m.get('torch_threads')} "
            f"threads, load {_num(m.get('load_average_1m'), '.2f')} at the start, "
            f"{m.get('date_utc', '')[:10]}, commit {m.get('git')}")


def table(r: dict[str, Any]) -> str:
    """One result file as a markdown section."""
    fl = r.get("floor", {})
    fwd, grad = fl.get("forward", {}), fl.get("gradient", {})
    reps = r.get("settings", {}).get("repeats", 1)
    lines = [
        f"### {r['model']}, {r['precision']}"
        + (f" (references {r['reference_precision']})"
           if r.get("reference_precision") != r["precision"] else ""),
        "",
        f"{r['images']} images at {r['image_size'][0]}×{r['image_size'][1]}; {_machine(r)}; "
        f"every row the best of {reps} run{'s' if reps != 1 else ''}."
        + (f" Floor: forward {_num(fwd.get('seconds_per_eval', math.nan) * 1e3, '.2f')} ms "
           f"per evaluation (batch {fwd.get('batch_size')}), forward + backward "
           f"{_num(grad.get('seconds_per_eval', math.nan) * 1e3, '.2f')} ms (batch "
           f"{grad.get('batch_size')})." if fl else ""),
    ]
    if r.get("records"):
        lines += ["", "| tool | method / setting | s/image | evals/img | counted f/b "
                  "| floor s/img | × floor | peak MB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
    for rec in r.get("records", []):
        if rec.get("error"):
            lines.append(f"| {rec['tool']} | {rec['name']} | {rec['error'][:60]} |||||| ")
            continue
        c = rec.get("counted") or {}
        counted = f"{c.get('forward', 0):.0f}/{c.get('backward', 0):.0f}" if c else "–"
        ex = rec.get("extra", {})
        lines.append(
            f"| {rec['tool']} | {rec['name']} | {_num(rec['seconds_per_image'], '.3f')} "
            f"| {_num(rec['evals_per_image'], '.0f')} | {counted} "
            f"| {_num(ex.get('floor_seconds_per_image'), '.3f')} "
            f"| {_num(ex.get('ratio_to_floor'), '.2f')} | {_num(rec['peak_memory_mb'], '.0f')} |")
    if r.get("speedups"):
        lines += ["", "vitxai's speed-up (reference s/image ÷ vitxai s/image; +seg: vitxai's "
                  "segmentation time added, as the reference segments inside its call):", "",
                  "| vitxai method | reference | speed-up |", "|---|---|---:|"]
        for u in r["speedups"]:
            tag = " +seg" if u["vitxai_includes_segmentation"] else ""
            lines.append(f"| {u.get('vitxai', u['method'])} | {u['reference']} | "
                         f"{u['speedup']:.2f}×{tag} |")
    sm = r.get("streamed_memory", {})
    if sm.get("runs"):
        runs = ", ".join(f"{x['images']} images {x['peak_memory_mb']:.0f} MB"
                         + (f" ({x['peak_gpu_memory_mb']:.0f} MB GPU)"
                            if x.get("peak_gpu_memory_mb") else "") for x in sm["runs"])
        fresh = (" (each in a fresh process)" if sm.get("fresh_process") else
                 " (in the benchmark's own process, whose earlier allocations hide growth: "
                 "superseded by the fresh-process `*-memory.json` runs)")
        lines += ["", f"Streamed `compare` (six methods, batch {sm.get('batch_size')}) peak "
                  f"memory{fresh}: {runs}; ratio {_num(sm.get('peak_ratio'), '.2f')}."]
    dc = r.get("default_compare")
    if dc:
        lines += ["", f"Default `vitxai compare`: {dc['seconds']:.1f} s wall "
                  f"(exit {dc['returncode']})."]
    if r.get("goals"):
        words = {True: "yes", False: "no", None: "n/a"}
        lines += ["", "Goals: " + "; ".join(
            f"{k}: **{words.get(v, v)}**"
            for k, v in r["goals"].items() if k != "measured_at_1000_samples") + "."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(RESULTS.glob("*.json"))
    if not paths:
        print(f"no results in {RESULTS}; run benchmarks/bench.py first", file=sys.stderr)
        return 1
    results = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    # bench.py's files only (results/ also holds convergence.py's and token_removal.py's)
    print("\n\n".join(table(r) for r in results if "records" in r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
