"""Swap after swap, no leak: the real daemon's RSS while it swaps 1,000+ times under REST and gRPC load.

    .venv/bin/python bench/swap_leak.py [--swaps 1200] [--warmup 200] [--bootstrap HOST:PORT]

The real daemon (``eddy serve``, head ``ncm``: the cheapest export) learns feature events of three
classes from a real broker, then exports and swaps as fast as it allows: ``eddy.v1.Admin/Export``
back to back, each a full export (ONNX graph, parity and quality gates, registry publish and prune,
session build, swap). Meanwhile one client thread sends OIP v2 infer over HTTP/REST (every other
request pinned to the previous version) and one sends eddy.v1 Predict over gRPC (every other one
pinned). Every ``--sample-every`` swaps the daemon's RSS, open files, threads and registry files
are sampled. Growth is measured from the end of ``--warmup`` swaps (backbone loaded, allocator
pools grown) to the end. Prints a table and writes ``bench/results/swap_leak.json``.

With no ``--bootstrap`` (nor ``EDDY_TEST_BOOTSTRAP``) a local broker is started on a free port.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
LIMIT_MB = 30.0  # what the test allows over 300 swaps after warm-up


class Clients:
    """One REST and one gRPC client thread calling until ``stop``; counts outcomes per protocol."""

    def __init__(self, http_port: int, grpc_addr: str, rows: np.ndarray) -> None:
        self.http_port, self.grpc_addr, self.rows = http_port, grpc_addr, rows
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._rest, daemon=True),
                        threading.Thread(target=self._grpc, daemon=True)]

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _count(self, key: str) -> None:
        with self.lock:
            self.outcomes[key] += 1

    def _rest(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        version, i = "", 0
        while not self.stop.is_set():
            row = self.rows[i % len(self.rows)]
            body = json.dumps({"inputs": [{"name": "FEATURES", "shape": [1, row.size], "datatype": "FP32",
                                           "data": row.tolist()}]})
            pinned = version and i % 2 and int(version) > 1
            path = f"/v2/models/eddy/versions/{int(version) - 1}/infer" if pinned else "/v2/models/eddy/infer"
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status == 200 and not pinned:
                version = answer["model_version"]
            # A pinned version may just have been pushed out by a swap: 404 is the contract then.
            self._count(f"rest {response.status}{' pinned' if pinned else ''}")
            i += 1
        conn.close()

    def _grpc(self) -> None:
        import grpc

        from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
        from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.grpc_addr) as channel:
            stub = pb_grpc.InferenceStub(channel)
            version, i = 0, 0
            while not self.stop.is_set():
                request = pb.PredictRequest(features=pb.Features(values=self.rows[i % len(self.rows)].tolist()))
                pinned = bool(version and i % 2 and version > 1)
                if pinned:
                    request.model_version = version - 1
                try:
                    reply = stub.Predict(request, timeout=30)
                    version = version if pinned else reply.model_version
                    self._count(f"grpc OK{' pinned' if pinned else ''}")
                except grpc.RpcError as exc:
                    self._count(f"grpc {exc.code().name}{' pinned' if pinned else ''}")
                i += 1


def sample(pid: int, registry: Path, swaps: int, seconds: float) -> dict[str, Any]:
    """The daemon's RSS (MB), open files, threads and registry files now."""
    import psutil

    proc = psutil.Process(pid)
    return {"swaps": swaps, "seconds": round(seconds, 2), "rss_mb": proc.memory_info().rss / 2**20,
            "open_files": proc.num_fds(), "threads": proc.num_threads(),
            "registry_files": len(list(registry.iterdir()))}


def run(bootstrap: str, tmp: Path, *, swaps: int, warmup: int, sample_every: int = 25) -> dict[str, Any]:
    """Run the daemon, swap ``warmup + swaps`` times under load; the samples and the summary."""
    import grpc
    from kafka import KafkaProducer

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc
    from tests.integration.daemon import daemon_env, start_daemon
    from tests.integration.streams import class_centers, feature_events

    topic = f"bench.leak.{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for _, _, value in feature_events(150, 3, seed=5):
        producer.send(topic, value)
    producer.flush()
    producer.close()
    # Routine exports off: every swap is one Admin/Export, so the count is exact.
    env = daemon_env(tmp, bootstrap, topic, EDDY_HEAD__KIND="ncm", EDDY_EXPORT__EVERY_SECONDS="86400",
                     EDDY_EXPORT__EVERY_EVENTS="100000000")
    daemon = start_daemon(tmp, env, name="leak")
    samples: list[dict[str, Any]] = []
    try:
        daemon.wait_metric('eddy_events_total{result="learned"}', lambda v: v >= 150)
        daemon.wait_metric("eddy_model_version", lambda v: v >= 1)
        registry = tmp / "models"
        start = time.perf_counter()
        with Clients(daemon.http_port, daemon.addr, class_centers(3, 5).astype(np.float32)) as clients, \
                grpc.insecure_channel(daemon.addr) as channel:
            admin = pb_grpc.AdminStub(channel)
            last = 0
            for done in range(1, warmup + swaps + 1):
                version = admin.Export(pb.ExportRequest(), timeout=60).model_version
                assert version > last, f"export {done} did not swap: version {version} after {last}"
                last = version
                if done % sample_every == 0 or done == warmup:
                    samples.append(sample(daemon.proc.pid, registry, done, time.perf_counter() - start))
            outcomes = dict(clients.outcomes)
        wall = time.perf_counter() - start
    finally:
        code = daemon.stop()
    return summarize(samples, warmup=warmup, swaps=swaps, wall=wall, outcomes=outcomes, exit_code=code)


def summarize(samples: list[dict[str, Any]], *, warmup: int, swaps: int, wall: float,
              outcomes: dict[str, int], exit_code: int) -> dict[str, Any]:
    """Growth after warm-up: RSS (total, and the first 300 swaps), files, threads; client outcomes."""
    after = [s for s in samples if s["swaps"] >= warmup]
    base = after[0]
    first_300 = [s for s in after if s["swaps"] <= warmup + 300]
    x = np.array([s["swaps"] for s in after], float)
    y = np.array([s["rss_mb"] for s in after], float)
    slope = float(np.polyfit(x, y, 1)[0]) * 100 if len(after) > 2 else float("nan")
    return {
        "swaps_measured": swaps, "warmup_swaps": warmup, "swaps_per_s": (warmup + swaps) / wall,
        "rss_mb_after_warmup": base["rss_mb"], "rss_mb_end": after[-1]["rss_mb"],
        "rss_growth_mb": after[-1]["rss_mb"] - base["rss_mb"],
        "rss_growth_mb_first_300": first_300[-1]["rss_mb"] - base["rss_mb"],
        "rss_max_minus_base_mb": max(s["rss_mb"] for s in after) - base["rss_mb"],
        "rss_slope_mb_per_100_swaps": slope,
        "open_files": [base["open_files"], after[-1]["open_files"]],
        "threads": [base["threads"], after[-1]["threads"]],
        "registry_files_max": max(s["registry_files"] for s in samples),
        "client_outcomes": outcomes, "daemon_exit_code": exit_code,
        "limit_mb_over_300_swaps": LIMIT_MB, "samples": samples,
    }


def main() -> None:
    """Run, print, write ``bench/results/swap_leak.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--swaps", type=int, default=1200, help="swaps measured after warm-up")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sample-every", type=int, default=25)
    parser.add_argument("--bootstrap", default=os.environ.get("EDDY_TEST_BOOTSTRAP"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eddy-leak-") as folder:
        tmp, kafka = Path(folder), None
        bootstrap = args.bootstrap
        if not bootstrap:
            from service.tools.broker import LocalKafka, free_port

            kafka = LocalKafka(port=free_port(), data_dir=tmp / "kafka")
            bootstrap = kafka.start(timeout=180)
        try:
            result = run(bootstrap, tmp, swaps=args.swaps, warmup=args.warmup, sample_every=args.sample_every)
        finally:
            if kafka is not None:
                kafka.stop()
    result["command"] = " ".join(["bench/swap_leak.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "swap_leak.json").write_text(json.dumps(result, indent=2))
    print(f"swaps: {args.warmup} warm-up + {args.swaps} measured, {result['swaps_per_s']:.1f}/s")
    print(f"RSS after warm-up {result['rss_mb_after_warmup']:.1f} MB, end {result['rss_mb_end']:.1f} MB: "
          f"growth {result['rss_growth_mb']:+.1f} MB ({result['rss_growth_mb_first_300']:+.1f} MB over the "
          f"first 300; slope {result['rss_slope_mb_per_100_swaps']:+.2f} MB / 100 swaps)")
    print(f"open files {result['open_files']}, threads {result['threads']}, "
          f"registry files <= {result['registry_files_max']}")
    print(f"client calls: {result['client_outcomes']}")


if __name__ == "__main__":
    main()
