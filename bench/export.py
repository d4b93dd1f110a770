"""Swap cost: build + serialise + load an ONNX head session (M=2048 projection, k=150, d=384)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from learner.export import check_parity, load_session, readout_to_onnx
from learner.heads.base import Readout

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"


def main(d: int = 384, m: int = 2048, k: int = 150, repeats: int = 20) -> dict:
    rng = np.random.default_rng(0)
    readout = Readout(tuple(f"c{i}" for i in range(k)), rng.normal(size=(m, k)).astype(np.float32),
                      rng.normal(size=k).astype(np.float32), 1.0,
                      projection=rng.normal(size=(m, d)).astype(np.float32) / np.sqrt(d))
    probe = rng.normal(size=(64, d)).astype(np.float32)
    rows: dict[str, list[float]] = {"build_ms": [], "serialise_ms": [], "load_ms": [], "parity_ms": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = readout_to_onnx(readout, metadata={"classes": json.dumps(list(readout.classes))})
        t1 = time.perf_counter()
        data = model.SerializeToString()
        t2 = time.perf_counter()
        session, _ = load_session(data)
        t3 = time.perf_counter()
        assert check_parity(readout, session, probe).ok
        t4 = time.perf_counter()
        for key, value in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            value_ms = value * 1e3
            rows[key].append(value_ms)
    summary = {key: float(np.median(v)) for key, v in rows.items()}
    summary["total_ms"] = sum(summary.values())
    result = {"d": d, "m": m, "k": k, "repeats": repeats, "median": summary, "bytes": len(data),
              "machine": {"python": platform.python_version(),
                          "cpu": platform.processor() or platform.machine(),
                          "onnx": onnx.__version__, "onnxruntime": ort.__version__}}
    print(f"{'step':<14}{'median ms':>10}")
    for key, value in summary.items():
        print(f"{key:<14}{value:>10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
