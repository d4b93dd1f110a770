"""A tiny run of the serving benchmark's swap part: it runs end to end and its safety checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_swap_part_runs_and_no_request_fails_or_goes_back(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "bench" / "serving.py"), "--quick", "--part", "swap",
               "--swaps", "60", "--block-seconds", "1", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    result = json.loads((tmp_path / "serving.json").read_text())
    swap = result["parts"]["swap"]
    assert swap["total_requests"] > 0
    assert swap["total_failed"] == 0
    assert swap["version_went_backwards"] is False
    assert swap["responses_inconsistent_with_their_version"] == 0
    assert swap["swaps_applied"] >= 60
    assert swap["conditions"]["swaps"]["versions_answered"] > 1  # clients really saw swaps
    assert swap["conditions"]["no_swaps"]["latency"]["p99_ms"] > 0
    assert result["parts"]["swap"]["run"]["machine"]["versions"]["grpcio"]
    assert (tmp_path / "serving_latency.png").stat().st_size > 0
    assert (tmp_path / "freshness.png").stat().st_size > 0
    assert "swap: p99 ratio" in done.stdout
