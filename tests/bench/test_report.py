"""The benchmark report generator on small fake result files: right numbers, hand-written text kept."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import END, README_END, README_START, START, replace_section, summarize, write_report


def _agg(subset: str, method: str, group: str, order: str, final: float, preq: float) -> dict:
    return {"dataset": "banking77", "subset": subset, "method": method, "group": group, "order": order,
            "seeds": [0, 1], "final_accuracy": final, "final_accuracy_std": 0.01, "prequential_accuracy": preq,
            "prequential_accuracy_std": 0.0, "forgetting": 0.02, "min_old_class_accuracy": 0.5,
            "learn_events_per_s": 1000.0}


def fake_results(folder: Path) -> None:
    rows = []
    for order, bump in (("class-incremental", 0.0), ("random", 0.05)):
        rows += [_agg("full", "eddy-ridge-M2048", "eddy", order, 0.92 + bump, 0.20 + bump),
                 _agg("full", "eddy-ncm", "eddy", order, 0.84, 0.30 + bump),
                 _agg("full", "eddy-slda", "eddy", order, 0.90, 0.31 + bump),
                 _agg("full", "blind-previous-label", "blind", order, 0.01, 0.02 + bump),
                 _agg("full", "blind-majority", "blind", order, 0.01, 0.03 + bump),
                 _agg("river-budget", "eddy-ridge-M2048", "eddy", order, 0.80, 0.60),
                 _agg("river-budget", "river-ovr-logistic", "river", order, 0.40 + bump, 0.35),
                 _agg("river-budget", "river-softmax", "river", order, 0.45, 0.30 + bump)]
    subset = {"source": "fake", "n_train": 100, "n_test": 10, "eval_every": 10,
              "joint_reference": {"accuracy": 0.93, "C": 10.0},
              "per_event_blind_prequential": {"random": {"0": {"previous_label": 0.01, "majority": 0.02}}}}
    accuracy = {"seeds": [0, 1], "orders": ["class-incremental", "random"], "batch_size": 256, "quick": True,
                "seconds": 12.0, "machine": {"cpu_count": 2, "load_average_at_start": [9.5, 8.0, 7.0]},
                "aggregate": rows,
                "datasets": {"banking77": {"subsets": {"full": subset, "river-budget": subset},
                                           "river_tuning": {"river-ovr-logistic": {
                                               "param": "lr", "value": 1.0, "scores": {"0.1": 0.2, "1.0": 0.3},
                                               "tuned_on": "fake tuning stream"}}}}}
    throughput = {"targets": {"ridge_vs_river_learn_ratio": 15.0, "text_e2e_vs_backbone_ratio": 0.85,
                              "features_e2e_vs_head_alone_ratio": 0.7,
                              "features_e2e_lean_json_vs_consume_ratio": 0.6},
                  "ratios": {"ridge_vs_river_learn_ratio": 40.0, "text_e2e_vs_backbone_ratio": 0.7,
                             "features_e2e_vs_head_alone_ratio": 0.75,
                             "features_e2e_lean_json_vs_consume_ratio": None}}
    (folder / "accuracy.json").write_text(json.dumps(accuracy))
    (folder / "throughput.json").write_text(json.dumps(throughput))


def test_summary_picks_each_number_from_its_defined_stream(tmp_path: Path) -> None:
    fake_results(tmp_path)
    from bench.report import load_results

    s = summarize(load_results(tmp_path))
    assert s["banking77_ridge_final_accuracy"] == 0.92  # full stream, class-incremental
    assert s["banking77_ridge_prequential_accuracy"] == 0.25  # full stream, random
    assert s["banking77_river_best_final_accuracy"] == 0.45  # best River, budget subset, class-incremental
    assert s["banking77_river_best_final_method"] == "river-softmax"
    assert s["banking77_river_best_prequential_accuracy"] == 0.35  # best River, budget subset, random
    assert s["banking77_ridge_final_accuracy_river_budget"] == 0.80
    assert s["banking77_ncm_prequential_accuracy"] == 0.35
    assert s["banking77_slda_prequential_accuracy"] == 0.36
    assert s["banking77_blind_prequential_accuracy"] == 0.07
    assert s["banking77_majority_prequential_accuracy"] == 0.08
    assert s["ridge_vs_river_learn_ratio"] == 40.0
    assert s["features_e2e_vs_head_alone_ratio"] == 0.75
    assert s["features_e2e_lean_json_vs_consume_ratio"] is None
    assert "features_e2e_vs_consume_ratio" not in s  # withdrawn (issue 19)
    assert s["seeds"] == [0, 1]


def test_report_replaces_only_the_marked_section_and_is_idempotent(tmp_path: Path) -> None:
    fake_results(tmp_path)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nHand-written method.\n\n{START}\nstale numbers\n{END}\n\nFooter.\n")
    summary = write_report(tmp_path, md, {"run_all": {"quick": True}})
    text = md.read_text()
    assert "Hand-written method." in text and text.rstrip().endswith("Footer.")
    assert "stale numbers" not in text
    assert text.count(START) == 1 and text.count(END) == 1
    assert "| `ridge_vs_river_learn_ratio` | 40.00 | >= 15.0 | yes |" in text
    assert "| `text_e2e_vs_backbone_ratio` | 0.70 | >= 0.85 | **no** |" in text
    assert "(not run: no" in text  # footprint.json and serving.json are missing
    assert "accuracy_over_time.png" in text
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["banking77_ridge_final_accuracy"] == summary["banking77_ridge_final_accuracy"] == 0.92
    assert saved["run_all"] == {"quick": True}
    assert saved["machine"]["load_average_at_start"] == [9.5, 8.0, 7.0]
    write_report(tmp_path, md, {"run_all": {"quick": True}})
    assert md.read_text() == text


def test_readme_gets_the_headline_table_between_its_own_markers(tmp_path: Path) -> None:
    fake_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# eddy\n\nIntro.\n\n{README_START}\nold table\n{README_END}\n\nMore prose.\n")
    write_report(tmp_path, tmp_path / "BENCHMARKS.md", readme=readme)
    text = readme.read_text()
    assert "old table" not in text and "Intro." in text and text.rstrip().endswith("More prose.")
    assert "| `text_e2e_vs_backbone_ratio` | 0.70 | >= 0.85 | **no** |" in text
    assert "Hand-written" not in text and START not in text  # only the headline, not the whole section


def test_no_results_at_all_gives_a_report_not_an_error(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    summary = write_report(tmp_path, md)
    assert summary["banking77_ridge_final_accuracy"] is None
    assert START in md.read_text() and END in md.read_text()


def test_replace_section_appends_markers_when_absent() -> None:
    out = replace_section("# Title\n\ntext\n", "new\n")
    assert out.startswith("# Title\n\ntext\n") and f"{START}\nnew\n{END}" in out
