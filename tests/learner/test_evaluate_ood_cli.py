"""``eddy eval --ood-test``: unlabelled out-of-scope rows, eddy's own threshold, a JSON report and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.app.cli import main


def write_jsonl(path: Path, X: np.ndarray, labels: list[str] | None) -> Path:
    with path.open("w") as fh:
        for i, row in enumerate(X):
            obj: dict[str, object] = {"features": [round(float(v), 6) for v in row]}
            if labels is not None:
                obj["label"] = labels[i]
            fh.write(json.dumps(obj) + "\n")
    return path


def test_eval_ood_test_reports_each_score_at_eddys_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDDY_CONFIG", str(tmp_path / "none.toml"))  # defaults: reject_rate 0.02
    rng = np.random.default_rng(0)

    def unit(A: np.ndarray) -> np.ndarray:
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    X = np.concatenate([unit(np.eye(10)[i] + 0.3 * rng.normal(size=(150, 10))) for i in range(3)])
    labels = [f"c{i}" for i in range(3) for _ in range(150)]
    train = write_jsonl(tmp_path / "train.jsonl", X, labels)
    ood = write_jsonl(tmp_path / "ood.jsonl", unit(np.eye(10)[7] + 0.3 * rng.normal(size=(80, 10))), None)
    out = tmp_path / "ood.json"
    assert main(["eval", "--train", str(train), "--ood-test", str(ood), "--head", "ncm", "--json", str(out),
                 "--ood-score", "msp", "mahalanobis"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reject_rate"] == 0.02 and set(printed["scores"]) == {"msp", "mahalanobis"}
    for m in printed["scores"].values():
        assert m["ood_auroc"] > 0.9 and m["ood_recall"] > 0.1 and m["threshold"] is not None
        assert 0.0 <= m["in_scope_reject_rate"] <= 0.1
    report = json.loads(out.read_text())
    assert report["n_ood"] == 80 and report["n_test"] == 90 and "hist" in report["scores"]["msp"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
