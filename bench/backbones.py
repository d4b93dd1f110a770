"""Backbones on banking77: accuracy vs encoder speed, gathered from ``eddy eval`` and ``eddy bench backbone``.

The numbers come from the CLI itself (the commands are in the README's Backbones section); this
script only collects their JSON files into ``bench/results/backbones.json``, prints a table and
draws ``bench/results/backbones.png`` (final accuracy against texts/s). A row whose run did not
finish is written with ``null`` and its reason, never guessed.

``python bench/backbones.py --runs DIR`` where DIR holds ``<row>.json`` eval reports and
``bench-<row>.json`` throughput reports (row names: see ``ROWS``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from bench.plots import figure, save

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# row -> (encoder, precision, ridge expansion width, throughput report holding its texts/s, which side)
ROWS = {
    "minilm-fp32": ("all-MiniLM-L6-v2", "fp32", 2048, "bench-minilm-int8", "baseline"),
    "minilm-int8": ("all-MiniLM-L6-v2", "int8", 2048, "bench-minilm-int8", "candidate"),
    "mpnet-2048": ("all-mpnet-base-v2", "fp32", 2048, "bench-mpnet", "candidate"),
    "mpnet-4096": ("all-mpnet-base-v2", "fp32", 4096, "bench-mpnet", "candidate"),
}


def collect(runs: Path) -> dict[str, Any]:
    """Every row's accuracy and throughput from the run files in ``runs`` (``None`` where missing)."""
    rows = []
    for row, (encoder, precision, width, bench, side) in ROWS.items():
        report = _load(runs / f"{row}.json")
        speed = _load(runs / f"bench-{bench.removeprefix('bench-')}.json")
        rows.append({
            "row": row, "encoder": encoder, "precision": precision, "expansion_width": width,
            "final_accuracy": report.get("final_accuracy") if report else None,
            "prequential_accuracy": report.get("prequential_accuracy") if report else None,
            "joint_reference_accuracy": report.get("joint_reference_accuracy") if report else None,
            "backbone_identity": report.get("backbone_identity") if report else None,
            "texts_per_s": speed.get(f"{side}_texts_per_s") if speed else None,
            "speed_vs_minilm_fp32": (speed["ratio"] if side == "candidate" else 1.0) if speed else None,
            "missing": [name for name, data in ((f"{row}.json", report), (f"{bench}.json", speed)) if not data],
        })
    throughput = {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("bench-*.json"))}
    return {"rows": rows, "throughput_runs": throughput, "machine": machine_info()}


def _load(path: Path) -> dict[str, Any] | None:
    return dict(json.loads(path.read_text())) if path.exists() else None


def plot(result: dict[str, Any], out: Path) -> None:
    """Final accuracy (%) against encoder texts/s, one labelled point per measured row."""
    fig, (ax,) = figure(width=6.0, height=4.0)
    for r in result["rows"]:
        if r["final_accuracy"] is None or r["texts_per_s"] is None:
            continue
        ax.scatter(r["texts_per_s"], 100 * r["final_accuracy"])
        ax.annotate(f"{r['row']}", (r["texts_per_s"], 100 * r["final_accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("encoder texts/s (2 shared CPU cores, log scale)")
    ax.set_ylabel("banking77 final accuracy, ridge (%)")
    ax.set_title("Backbones: accuracy vs speed")
    save(fig, out)


def markdown(result: dict[str, Any]) -> str:
    """The README table (between the ``backbones:start/end`` markers)."""
    lines = ["| encoder | precision | ridge M | final accuracy | joint LR reference | texts/s (2 shared cores) "
             "| vs MiniLM fp32, same run |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = f"**{100 * r['final_accuracy']:.2f}%**" if r["final_accuracy"] is not None else "not measured"
        ref = f"{100 * r['joint_reference_accuracy']:.2f}%" if r["joint_reference_accuracy"] else "-"
        tps = f"{r['texts_per_s']:.1f}" if r["texts_per_s"] is not None else "-"
        ratio = f"{r['speed_vs_minilm_fp32']:.2f}x" if r["speed_vs_minilm_fp32"] is not None else "-"
        cells = [r["encoder"], r["precision"], str(r["expansion_width"]), acc, ref, tps, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(table: str, readme: Path = REPO / "README.md") -> None:
    """Replace the text between ``<!-- backbones:start -->`` and ``<!-- backbones:end -->``."""
    text = readme.read_text()
    start, end = "<!-- backbones:start -->", "<!-- backbones:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--readme", action="store_true", help="also rewrite the README's Backbones table")
    args = parser.parse_args()
    result = collect(args.runs)
    print(f"{'row':<14}{'final acc':>10}{'texts/s':>10}{'vs MiniLM':>10}  missing")
    for r in result["rows"]:
        acc = f"{100 * r['final_accuracy']:.2f}" if r["final_accuracy"] is not None else "-"
        tps = f"{r['texts_per_s']:.1f}" if r["texts_per_s"] is not None else "-"
        ratio = f"{r['speed_vs_minilm_fp32']:.2f}x" if r["speed_vs_minilm_fp32"] is not None else "-"
        print(f"{r['row']:<14}{acc:>10}{tps:>10}{ratio:>10}  {', '.join(r['missing'])}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backbones.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "backbones.png")
    if args.readme:
        update_readme(markdown(result))


if __name__ == "__main__":
    main()
