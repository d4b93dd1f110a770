"""No leak across swaps: the real daemon swaps 400 times under REST and gRPC load, and stays flat.

The harness is the benchmark's (``bench/swap_leak.py``, which runs 1,000+ swaps and reports the
figure); here 100 warm-up swaps are followed by 300 measured ones.
"""

from __future__ import annotations

import pytest

from bench.swap_leak import LIMIT_MB, run

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_rss_files_and_threads_stay_flat_over_300_swaps_under_load(kafka_bootstrap, tmp_path):
    result = run(kafka_bootstrap, tmp_path, swaps=300, warmup=100, sample_every=25)
    assert result["daemon_exit_code"] == 0
    assert result["rss_growth_mb_first_300"] <= LIMIT_MB, result["samples"]
    # ONNX Runtime sessions, sockets and registry files do not pile up either.
    assert result["open_files"][1] <= result["open_files"][0] + 2, result["samples"]
    assert result["threads"][1] <= result["threads"][0] + 2, result["samples"]
    assert result["registry_files_max"] <= 2 * 10 + 2  # export.keep = 10 models and sidecars, manifest, lock
    outcomes = result["client_outcomes"]
    assert outcomes.get("rest 200", 0) > 100 and outcomes.get("grpc OK", 0) > 100, outcomes
    assert outcomes.get("rest 200 pinned", 0) > 100 and outcomes.get("grpc OK pinned", 0) > 100, outcomes
    # The only refusal allowed is a pinned version pushed out by a swap just before the request.
    assert set(outcomes) <= {"rest 200", "grpc OK", "rest 200 pinned", "grpc OK pinned",
                             "rest 404 pinned", "grpc NOT_FOUND pinned"}, outcomes
