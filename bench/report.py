"""Benchmark JSON -> ``summary.json`` and the generated results section of BENCHMARKS.md.

    .venv/bin/python bench/report.py [--results bench/results] [--markdown BENCHMARKS.md]

Pure functions of the result files: ``summarize`` picks the headline numbers (each defined in
``DEFINITIONS``), ``render`` writes markdown tables and the PNGs to show, ``replace_section``
swaps the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` (the rest of the
file is hand-written and left alone). A missing result file gives a "not run" line, never an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
# The README carries the headline table only, between its own markers.
README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"
NAMES = ("accuracy", "throughput", "footprint", "heads", "backbone", "memory", "export", "serving",
         "heads_banking77", "grpc_latency")
Results = dict[str, dict[str, Any]]
HEADLINE_RATIOS = ("ridge_vs_river_learn_ratio", "text_e2e_vs_backbone_ratio", "features_e2e_vs_head_alone_ratio",
                   "features_e2e_lean_json_vs_consume_ratio")

DEFINITIONS = {
    "ridge_vs_river_learn_ratio": "eddy ridge M=2048 (default head) learn events/s on 384-d features / "
                                  "fastest accurate River learner's learn_one events/s (medians, alternating rounds)",
    "text_e2e_vs_backbone_ratio": "daemon text events/s through Kafka (first learned batch -> next-to-last) / bare "
                                  "backbone sentences/s on the same texts in the daemon's calls of 512; "
                                  "median of rounds alternating reference and daemon",
    "features_e2e_vs_head_alone_ratio": "daemon (default config) feature events/s through Kafka, JSON arrays, 50 "
                                        "classes / its default head (ridge M=2048) learning the same features in "
                                        "process with no Kafka: what the daemon adds over its head's math; median "
                                        "of alternating rounds",
    "features_e2e_lean_json_vs_consume_ratio": "daemon with a lean head (ridge M=0, no replay memory, no "
                                               "compensation) feature events/s / bare kafka-python consume "
                                               "messages/s of the same messages; median of alternating rounds",
    "features_head_alone_vs_consume_ratio": "default head alone / bare consume (context: the head's math, not "
                                            "Kafka, bounds the default daemon on this machine)",
    "banking77_*_final_accuracy": "test accuracy after streaming, class-incremental order, mean over seeds; "
                                  "eddy: full stream; River: the River-budget subsample (best River method)",
    "banking77_*_prequential_accuracy": "test-then-train accuracy in batches of 256, random order, mean over "
                                        "seeds; eddy/blind: full stream; River: River-budget subsample",
    "*_river_budget": "eddy on the same River-budget subsample as River (matched comparison)",
}


def load_results(folder: Path) -> Results:
    """Every known ``<name>.json`` in ``folder`` that exists and parses, keyed by name."""
    out: Results = {}
    for name in NAMES:
        path = Path(folder) / f"{name}.json"
        try:
            out[name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def _agg(results: Results, dataset: str, subset: str, order: str) -> list[dict[str, Any]]:
    return [r for r in results.get("accuracy", {}).get("aggregate", [])
            if (r["dataset"], r["subset"], r["order"]) == (dataset, subset, order)]


def _metric(rows: list[dict[str, Any]], method: str, metric: str) -> float | None:
    return next((r[metric] for r in rows if r["method"] == method), None)


def _best(rows: list[dict[str, Any]], group: str, metric: str) -> tuple[str | None, float | None]:
    candidates = [r for r in rows if r["group"] == group and r.get(metric) is not None]
    if not candidates:
        return None, None
    top = max(candidates, key=lambda r: r[metric])
    return top["method"], top[metric]


def summarize(results: Results) -> dict[str, Any]:
    """The headline numbers (``None`` where the benchmark behind one did not run)."""
    ratios = results.get("throughput", {}).get("ratios", {})
    s: dict[str, Any] = {k: ratios.get(k) for k in HEADLINE_RATIOS}
    s["ridge_M0_vs_river_learn_ratio"] = results.get("throughput", {}).get("learn", {}).get(
        "ridge_M0_vs_river_learn_ratio")
    feats = results.get("throughput", {}).get("features", {})
    s["features_head_alone_vs_consume_ratio"] = feats.get("head_alone_vs_consume_ratio")
    ci_full, rnd_full = _agg(results, "banking77", "full", "class-incremental"), _agg(results, "banking77", "full",
                                                                                       "random")
    ci_bud = _agg(results, "banking77", "river-budget", "class-incremental")
    rnd_bud = _agg(results, "banking77", "river-budget", "random")
    s["banking77_ridge_final_accuracy"] = _metric(ci_full, "eddy-ridge-M2048", "final_accuracy")
    s["banking77_ridge_prequential_accuracy"] = _metric(rnd_full, "eddy-ridge-M2048", "prequential_accuracy")
    s["banking77_river_best_final_method"], s["banking77_river_best_final_accuracy"] = _best(
        ci_bud, "river", "final_accuracy")
    s["banking77_river_best_prequential_method"], s["banking77_river_best_prequential_accuracy"] = _best(
        rnd_bud, "river", "prequential_accuracy")
    s["banking77_ridge_final_accuracy_river_budget"] = _metric(ci_bud, "eddy-ridge-M2048", "final_accuracy")
    s["banking77_ridge_prequential_accuracy_river_budget"] = _metric(rnd_bud, "eddy-ridge-M2048",
                                                                     "prequential_accuracy")
    s["banking77_ncm_prequential_accuracy"] = _metric(rnd_full, "eddy-ncm", "prequential_accuracy")
    s["banking77_slda_prequential_accuracy"] = _metric(rnd_full, "eddy-slda", "prequential_accuracy")
    s["banking77_blind_prequential_accuracy"] = _metric(rnd_full, "blind-previous-label", "prequential_accuracy")
    s["banking77_majority_prequential_accuracy"] = _metric(rnd_full, "blind-majority", "prequential_accuracy")
    s["banking77_avalanche_slda_final_accuracy"] = _metric(ci_full, "avalanche-slda", "final_accuracy")
    subsets = results.get("accuracy", {}).get("datasets", {}).get("banking77", {}).get("subsets", {})
    s["banking77_joint_reference_accuracy"] = subsets.get("full", {}).get("joint_reference", {}).get("accuracy")
    s["seeds"] = results.get("accuracy", {}).get("seeds")
    s["definitions"] = DEFINITIONS
    return s


# -- markdown ------------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _pm(row: dict[str, Any], metric: str) -> str:
    value, std = row.get(metric), row.get(f"{metric}_std")
    return _fmt(value) + (f" ± {std:.3f}" if std else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _headline(results: Results, summary: dict[str, Any]) -> str:
    targets = results.get("throughput", {}).get("targets", {})
    rows = []
    for key in HEADLINE_RATIOS:
        value, target = summary.get(key), targets.get(key)
        met = "-" if value is None or target is None else ("yes" if value >= target else "**no**")
        rows.append([f"`{key}`", _fmt(value, 2), f">= {target}" if target else "-", met])
    river = summary.get("banking77_river_best_final_accuracy")
    for key, value in summary.items():
        if key == "banking77_ridge_final_accuracy" and value is not None:
            met = value >= 0.925 and (river is None or value >= river + 0.05)
            rows.append([f"`{key}`", _fmt(value), ">= 0.925 and >= River best + 0.05", "yes" if met else "**no**"])
        elif key.startswith("banking77_") and not isinstance(value, str | dict):
            rows.append([f"`{key}`", _fmt(value), "", ""])
        elif key.startswith("banking77_") and isinstance(value, str):
            rows.append([f"`{key}`", value, "", ""])
    return table(["number", "value", "target", "met"], rows)


def _accuracy(doc: dict[str, Any]) -> list[str]:
    out = [f"Seeds {doc.get('seeds')}, orders {doc.get('orders')}, "
           f"{'--quick' if doc.get('quick') else 'full'} run, {doc.get('seconds', 0):.0f} s. "
           f"avalanche-lib: {doc.get('avalanche_slda')}."]
    out += [f"- {note}" for note in doc.get("notes", [])]
    for dataset, entry in doc.get("datasets", {}).items():
        for subset, info in entry.get("subsets", {}).items():
            joint = info.get("joint_reference", {})
            out.append(f"\n**{dataset} / {subset}**: {info.get('source')}; {info.get('n_train')} streamed, "
                       f"{info.get('n_test')} test rows, batches of {info.get('batch_size', doc.get('batch_size'))}. "
                       f"Joint offline logistic regression (C={joint.get('C')}): "
                       f"{_fmt(joint.get('accuracy'))}.\n")
            rows = []
            methods = list(dict.fromkeys(r["method"] for r in doc.get("aggregate", [])
                                         if (r["dataset"], r["subset"]) == (dataset, subset)))
            for m in methods:
                by = {r["order"]: r for r in doc["aggregate"]
                      if (r["dataset"], r["subset"], r["method"]) == (dataset, subset, m)}
                ci, rnd = by.get("class-incremental", {}), by.get("random", {})
                rows.append([m, _pm(ci, "final_accuracy"), _pm(rnd, "final_accuracy"),
                             _pm(rnd, "prequential_accuracy"), _pm(ci, "prequential_accuracy"),
                             _fmt(ci.get("forgetting")), _fmt(ci.get("min_old_class_accuracy")),
                             _fmt(rnd.get("learn_events_per_s"))])
            out.append(table(["method", "final (class-incr.)", "final (random)", "prequential (random)",
                              "prequential (class-incr.)", "forgetting (c-i)", "worst old-class acc. (c-i)",
                              "learn events/s"], rows))
            per_event = info.get("per_event_blind_prequential", {})
            if per_event:
                parts = [f"{order}: previous-label {_fmt(_mean([v['previous_label'] for v in seeds.values()]))}, "
                         f"majority {_fmt(_mean([v['majority'] for v in seeds.values()]))}"
                         for order, seeds in per_event.items()]
                out.append("\nBlind baselines with batches of one event: " + "; ".join(parts) + ".")
        tuning = entry.get("river_tuning", {})
        if tuning:
            out.append(f"\n**River tuning ({dataset})**: "
                       + next(iter(tuning.values())).get("tuned_on", "") + "\n")
            out.append(table(["method", "parameter", "chosen", "hold-out accuracy per candidate"],
                             [[m, t["param"], _fmt(t["value"], 3),
                               ", ".join(f"{k}: {_fmt(v)}" for k, v in t["scores"].items())]
                              for m, t in tuning.items()]))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _throughput(doc: dict[str, Any]) -> list[str]:
    out = []
    learn = doc.get("learn")
    if learn:
        out.append(f"Learn rate on precomputed 384-d banking77 features ({learn['rounds']} alternating rounds, "
                   f"after {learn['warm_up_events']} warm-up events; River method: {learn['river_choice']}).\n")
        out.append(table(["learner", "median events/s", "per round"],
                         [[k, _fmt(learn["median_events_per_s"][k]), ", ".join(_fmt(v) for v in vs)]
                          for k, vs in learn["events_per_s"].items()]))
    text = doc.get("text")
    if text and "rounds" in text:
        refs = text["backbone_calls_of_512_sentences_per_s"]
        out.append(f"\nText end to end: {text['rounds']} rounds of {text['events_per_round']} banking77 texts, "
                   "alternating with the bare backbone in the daemon's calls of 512 (the daemon resumes from "
                   "its snapshot each round; start-up and its first batch excluded).\n")
        rows = [[f"round {i + 1}", _fmt(d["events_per_s"], 1), f"{_fmt(refs[i], 1)} / {_fmt(refs[i + 1], 1)}",
                 _fmt(r, 3), f"{d['daemon_rss_bytes'] / 2**20:.0f} MiB"]
                for i, (d, r) in enumerate(zip(text["daemon"], text["round_ratios"], strict=True))]
        out.append(table(["round", "daemon events/s", "backbone before / after", "ratio", "daemon RSS"], rows))
        out.append(f"\nMedian ratio {_fmt(text['text_e2e_vs_backbone_ratio'], 3)}; the backbone in calls of 64 "
                   f"(its own batch, more padding): {_fmt(text.get('backbone_calls_of_64_sentences_per_s'), 1)} "
                   "sentences/s.")
    feats = doc.get("features")
    if feats and "daemon" in feats and "head_alone_events_per_s" in feats:
        out.append(f"\nFeatures end to end: {feats['rounds']} rounds of {feats['events_per_round']:,} events "
                   f"({feats['classes']} classes, {feats['encoding']}, {feats['message_bytes_mean']:,.0f} bytes "
                   "each) on one topic; each round: bare consume, the default head alone in process, the daemon "
                   "with its default config, the daemon with a lean head; references once more at the end.\n")
        raws, heads = feats["raw_consume_messages_per_s"], feats["head_alone_events_per_s"]
        ratios = feats["round_ratios"]
        rows = [[f"round {i + 1}", f"{_fmt(raws[i])} / {_fmt(raws[i + 1])}", f"{_fmt(heads[i])} / {_fmt(heads[i + 1])}",
                 f"{d['events_per_s']:,.0f}", _fmt(ratios["default_vs_head_alone"][i], 2),
                 f"{lean['events_per_s']:,.0f}", _fmt(ratios["lean_vs_consume"][i], 2),
                 f"{feats['load_average_per_round'][i][0]:.1f}"]
                for i, (d, lean) in enumerate(zip(feats["daemon"]["default"], feats["daemon"]["lean"], strict=True))]
        out.append(table(["round", "raw consume msgs/s (before / after)", "head alone events/s (before / after)",
                          "daemon default events/s", "/ head alone", "daemon lean events/s", "/ consume",
                          "load average"], rows))
        out.append(f"\nMedians: default daemon / head alone {_fmt(feats['features_e2e_vs_head_alone_ratio'], 2)}, "
                   f"lean daemon / bare consume {_fmt(feats['features_e2e_lean_json_vs_consume_ratio'], 2)}; for "
                   f"context, the head alone / bare consume {_fmt(feats['head_alone_vs_consume_ratio'], 2)} and the "
                   f"default daemon / bare consume {_fmt(feats['features_e2e_default_vs_consume_ratio'], 2)}.")
    return out


def _footprint(doc: dict[str, Any]) -> list[str]:
    rows = [[h["name"], str(h["classes"]), f"{h['state_bytes'] / 2**20:.2f} MiB"] for h in doc.get("heads", [])]
    mem = doc.get("replay_memory")
    if mem:
        rows.append([f"replay memory, {mem['items']} items ({mem['index']})", "-", f"{mem['nbytes'] / 2**20:.2f} MiB"])
    return [table(["state", "classes", "bytes"], rows)]


def _others(results: Results) -> list[str]:
    out = []
    heads = results.get("heads")
    if heads:
        out.append("\n**Head learn rates (synthetic features, bench/heads.py)**\n")
        out.append(table(["head", "events/s"], [[r["name"], _fmt(r["events_per_s"])] for r in heads.get("learn", [])]))
    backbone = results.get("backbone")
    if backbone:
        out.append("\n**Backbone (bench/backbone.py)**\n")
        out.append(table(["runtime", "padding", "sentences/s"],
                         [[r["runtime"], r["padding"], _fmt(r["sentences_per_s"], 1)] for r in backbone["results"]]))
    memory = results.get("memory")
    if memory:
        out.append(f"\n**Replay memory (bench/memory.py, n={memory.get('n')})**\n")
        out.append(table(["index", "add/s", "p50 ms", "p99 ms", "recall@10", "MiB"],
                         [[r["kind"], _fmt(r["add_per_s"]), _fmt(r["p50_ms"], 2), _fmt(r["p99_ms"], 2),
                           _fmt(r["recall_at_10"]), f"{r['nbytes'] / 2**20:.1f}"] for r in memory["results"]]))
    export = results.get("export")
    if export:
        out.append("\n**Export / swap cost (bench/export.py)**: "
                   + ", ".join(f"{k} {v:.1f}" for k, v in export["median"].items()) + ".")
    return out


def _serving(doc: dict[str, Any]) -> list[str]:
    try:
        sys.path.insert(0, str(REPO))
        from bench.serving import table_rows

        rows = table_rows(doc.get("parts", {}))
        return [table(["measure", "value", "target"], [list(map(str, r)) for r in rows])]
    except Exception as exc:  # another helper's module: never let its shape break the report
        return [f"(serving table unavailable: {type(exc).__name__}: {exc}; see bench/results/serving.json)"]


PNGS = (("accuracy_over_time.png", "accuracy"), ("final_accuracy.png", "accuracy"),
        ("serving_latency.png", "serving"), ("freshness.png", "serving"))


def render(results: Results, summary: dict[str, Any], folder: str = "bench/results") -> str:
    """The generated section (without the markers)."""
    parts: list[str] = ["_Generated by `bench/run_all.py` from the JSON files in bench/results; do not edit._\n"]
    machine = results.get("accuracy", results.get("throughput", {})).get("machine", {})
    if machine:
        parts.append(f"Machine: {machine.get('cpu_count')} CPUs, load average at start "
                     f"{machine.get('load_average_at_start')}, Python {machine.get('python')}, commit "
                     f"{machine.get('git_commit')}.\n")
    parts += ["### Headline numbers\n", _headline(results, summary)]
    sections: list[tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = [
        ("accuracy", "### Accuracy on real streams (bench/accuracy.py)", _accuracy),
        ("throughput", "### Throughput (bench/throughput.py)", _throughput),
        ("footprint", "### Memory footprint (bench/footprint.py)", _footprint),
        ("serving", "### Serving (bench/serving.py)", _serving),
    ]
    for name, title, fn in sections:
        parts.append(f"\n{title}\n")
        parts += fn(results[name]) if name in results else [f"(not run: no {folder}/{name}.json)"]
    others = _others(results)
    if others:
        parts.append("\n### Component benchmarks\n")
        parts += others
    pngs = [f"![{png}]({folder}/{png})" for png, needs in PNGS if needs in results]
    if pngs:
        parts.append("\n### Plots\n")
        parts += pngs
    return "\n".join(parts) + "\n"


def replace_section(text: str, section: str, start: str = START, end: str = END) -> str:
    """``text`` with everything between the markers replaced by ``section`` (markers appended if absent)."""
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return f"{head}{start}\n{section}{end}{tail}"
    return f"{text.rstrip()}\n\n## Results\n\n{start}\n{section}{end}\n"


def write_report(results_dir: Path, markdown: Path, extra: dict[str, Any] | None = None,
                 readme: Path | None = None) -> dict[str, Any]:
    """Write ``summary.json`` next to the results and regenerate the section of ``markdown``.

    ``readme``, if it has the headline markers, gets the headline table between them.
    ``extra`` (e.g. run_all's machine info and per-module status) is merged into the summary.
    """
    results = load_results(results_dir)
    summary = summarize(results)
    summary["machine"] = results.get("accuracy", results.get("throughput", {})).get("machine")
    summary.update(extra or {})
    (Path(results_dir) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    folder = Path(results_dir).resolve()
    try:
        rel = str(folder.relative_to(Path(markdown).resolve().parent))
    except ValueError:
        rel = str(folder)
    text = Path(markdown).read_text() if Path(markdown).exists() else "# Benchmarks\n"
    Path(markdown).write_text(replace_section(text, render(results, summary, rel)))
    if readme is not None and readme.exists() and README_START in (readme_text := readme.read_text()):
        headline = ("_Generated from bench/results/summary.json by `make bench`; do not edit._\n\n"
                    + _headline(results, summary) + "\n")
        readme.write_text(replace_section(readme_text, headline, README_START, README_END))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    summary = write_report(args.results, args.markdown, readme=REPO / "README.md")
    for key, value in summary.items():
        if key not in ("definitions", "machine"):
            print(f"{key:<52}{_fmt(value)}")


if __name__ == "__main__":
    main()
