"""eddy's serving benchmark: swap safety, prediction latency, and label-to-servable freshness.

    .venv/bin/python bench/serving.py [--quick] [--part swap|latency|freshness|all]

Prints a table, writes ``bench/results/serving.json`` (a single ``--part`` replaces only its own
section) and the plots ``serving_latency.png`` and ``freshness.png``.

1. **swap** -- the real gRPC server (``start_server`` on 127.0.0.1:0, in this process, on its own
   asyncio thread) serves a ``ModelSlot``; a swapper thread in the same process builds real ONNX
   heads (``readout_to_onnx`` of a random d=384, k=50 ``Readout``, version ``v`` from seed ``v``)
   with ``make_session`` / ``ServedModel.from_session`` and swaps them in, while client *processes*
   (spawned, each with its own channel and GIL) send eddy.v1 Predict(features) at a paced rate.
   Blocks with and without swaps alternate in the same run. Every response is checked: success,
   ``model_version`` never decreasing per client, and its label equal to what the readout of that
   version predicts (so a response can only come from the whole model it names).
2. **latency** -- features at concurrency 8 through eddy.v1 and OIP v2 (``tritonclient.grpc.aio``),
   and OIP v2 over HTTP/REST (JSON as curl sends it, from a lean keep-alive client; and the
   unmodified ``tritonclient.http.aio`` with binary tensor data) against the same server child process
   (``bench/grpc_latency.py --serve``: its own GIL, gRPC and HTTP on one event loop); short text at
   concurrency 1, once idle and once against the real daemon (real broker) while it learns text
   events produced continuously.
3. **freshness** -- the real daemon + real broker: for each new class, the time from producing
   its first labeled events to the first Predict (polled every 20 ms) answering that class;
   precomputed features (d=384), then text (banking77 categories).

perf_analyzer does not run on these Debian 12 machines (it needs glibc 2.38), so the load
generator is this script's own client (grpc / tritonclient). The machine has 2 CPU cores shared
with other sessions: clients, server, learner and broker all compete for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import plots  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BANKING77 = ROOT.parent / "shared" / "data" / "banking77"
D, K_SWAP = 384, 50
SWAP_CLASSES = tuple(f"class-{i:02d}" for i in range(K_SWAP))
LOAD_GENERATOR_NOTE = ("perf_analyzer does not run on these Debian 12 machines (it needs glibc 2.38), so "
                       "the load generator is this script's own client (grpcio / tritonclient.grpc.aio)")
MACHINE_NOTE = ("2 CPU cores shared with other sessions: load generator, server, learner and broker "
                "compete for the same 2 cores, so tails are noisy")
TARGETS = {"swap_p99_ratio": 1.5, "features_c8_p99_ms": 5.0, "text_c1_p99_ms": 60.0,
           "freshness_p50_s": 1.0, "freshness_p99_s": 2.0}
SERVER_OPTIONS: dict[str, Any] = dict(
    host="127.0.0.1", port=0, model_name="eddy", max_message_bytes=4 << 20, max_batch=1024,
    max_text_chars=10_000, admin=None, admin_token=None, predict_token=None, tls_cert=None, tls_key=None)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (``--quick`` or full)."""

    swaps: int  # model versions published during the swap blocks
    swap_blocks: int  # alternating swap / no-swap blocks, swap first
    block_seconds: float
    clients: int  # client processes in the swap part
    client_rate: float  # requests/s per client
    latency_requests: int  # per features endpoint
    text_requests: int  # per text case
    fresh_feature_classes: int
    fresh_text_classes: int
    events_per_class: int
    learning_seconds: float  # text latency while the daemon learns


# Swaps come 20 times a second: ten times what a daemon does at most (routine exports are >= 1 s
# apart, new classes wait for the export in flight), and 1,000+ of them take a minute.
QUICK = Plan(swaps=1000, swap_blocks=4, block_seconds=25.0, clients=4, client_rate=60.0,
             latency_requests=3000, text_requests=150, fresh_feature_classes=15, fresh_text_classes=5,
             events_per_class=20, learning_seconds=10.0)
FULL = Plan(swaps=1200, swap_blocks=6, block_seconds=20.0, clients=4, client_rate=60.0,
            latency_requests=10_000, text_requests=400, fresh_feature_classes=50, fresh_text_classes=10,
            events_per_class=20, learning_seconds=20.0)


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def summarize(seconds: np.ndarray | list[float]) -> dict[str, Any]:
    """Latency summary in ms (n, mean, p50, p90, p99, p99.9, max) plus a compact CDF for plots."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    if ms.size == 0:
        return {"n": 0}
    x, level = plots.quantile_curve(ms)
    pct = np.percentile(ms, [50, 90, 99, 99.9])
    return {"n": int(ms.size), "mean_ms": float(ms.mean()), "p50_ms": float(pct[0]), "p90_ms": float(pct[1]),
            "p99_ms": float(pct[2]), "p999_ms": float(pct[3]), "max_ms": float(ms.max()),
            "cdf": {"ms": x, "level": level}}


def machine_info() -> dict[str, Any]:
    """CPU count, load average now, platform, and the versions that matter for serving."""
    import grpc
    import onnxruntime

    try:
        from importlib.metadata import version

        triton = version("tritonclient")
    except Exception:
        triton = "unknown"
    return {"cpus": os.cpu_count(), "load_avg_at_start": list(os.getloadavg()),
            "platform": platform.platform(), "note": MACHINE_NOTE,
            "versions": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                         "grpcio": grpc.__version__, "numpy": np.__version__, "tritonclient": triton}}


def swap_readout(seed: int, version: int) -> Any:
    """The readout published as ``version``: random weights from ``(seed, version)`` (d=384, k=50)."""
    from learner.heads.base import Readout

    rng = np.random.default_rng([seed, version])
    return Readout(classes=SWAP_CLASSES, weight=rng.normal(size=(D, K_SWAP)).astype(np.float32),
                   bias=(0.1 * rng.normal(size=K_SWAP)).astype(np.float32), temperature=1.0)


def build_served(readout: Any, version: int) -> Any:
    """Export ``readout`` to ONNX and wrap it as a warmed ``ServedModel`` (what the exporter does)."""
    from learner.export import readout_to_onnx
    from service.models.served import ServedModel, make_session

    meta = {"classes": json.dumps(list(readout.classes)), "model_version": str(version),
            "head_kind": "bench", "created_at": f"{time.time():.3f}"}
    data = readout_to_onnx(readout, metadata=meta).SerializeToString()
    return ServedModel.from_session(make_session(data), version=version, meta=meta)


def client_features(seed: int, client: int, n: int = 8) -> np.ndarray:
    """The feature rows client ``client`` sends (float32 ``(n, 384)``)."""
    return np.random.default_rng([seed, 1000 + client]).normal(size=(n, D)).astype(np.float32)


class InProcessServer:
    """``start_server`` on 127.0.0.1:0 in an asyncio loop on its own thread of this process."""

    def __init__(self, slot: Any) -> None:
        from service.serving.grpc.server import start_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-grpc", daemon=True)
        self.thread.start()
        self.server, self.port = self._call(start_server(slot, **SERVER_OPTIONS))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        """Stop the server (1 s grace) and its loop."""
        from service.serving.grpc.server import stop_server

        self._call(stop_server(self.server, 1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ---------------------------------------------------------------------------------------------
# 1. swap safety
# ---------------------------------------------------------------------------------------------
class Swapper(threading.Thread):
    """Builds and swaps in versions ``first+1, first+2, ...`` every ``interval`` s while ``active``.

    Falls behind rather than skipping: when a build takes longer than the interval, the next one
    starts at once, so the target count is reached unless the CPU is starved.
    """

    def __init__(self, slot: Any, seed: int, first_version: int, interval: float) -> None:
        super().__init__(name="bench-swapper", daemon=True)
        self.slot, self.seed, self.interval = slot, seed, interval
        self.next_version = first_version + 1
        self.active, self.halt = threading.Event(), threading.Event()
        self.applied = self.refused = 0
        self.build_seconds: list[float] = []
        self.swap_times: list[float] = []

    def run(self) -> None:
        """Swap on schedule while ``active`` until ``halt``."""
        due: float | None = None
        while not self.halt.is_set():
            if not self.active.wait(0.05):
                due = None
                continue
            now = time.monotonic()
            due = now if due is None else due
            if now < due:
                time.sleep(min(due - now, 0.05))
                continue
            start = time.perf_counter()
            model = build_served(swap_readout(self.seed, self.next_version), self.next_version)
            self.build_seconds.append(time.perf_counter() - start)
            if self.slot.swap(model):
                self.applied += 1
            else:
                self.refused += 1
            self.swap_times.append(time.monotonic())
            self.next_version += 1
            due += self.interval


def swap_client(addr: str, rate: float, index: int, seed: int, ready: Any, go: Any, stop: Any,
                out_path: str) -> None:
    """One client process: paced eddy.v1 Predict(features) until ``stop``; rows saved to ``out_path``.

    Columns: send time (``time.monotonic``, comparable across processes on Linux), latency s,
    status code (0 = OK), model_version, top label index (-1 on failure), feature row index.
    Each client has one request in flight at a time, so send order is answer order.
    """
    import grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    X = client_features(seed, index)
    requests = [pb.PredictRequest(features=pb.Features(values=row.tolist()), top_k=1) for row in X]
    rows: list[tuple[float, float, int, int, int, int]] = []
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for r in requests * 3:  # connect and warm up
            stub.Predict(r, timeout=10)
        ready.put(index)
        go.wait(120)
        period = 1.0 / rate
        due = time.monotonic() + period * np.random.default_rng([seed, index]).random()  # de-phase clients
        i = 0
        while not stop.is_set():
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            j = i % len(requests)
            sent = time.monotonic()
            t0 = time.perf_counter()
            try:
                resp = stub.Predict(requests[j], timeout=5)
                code, version = 0, int(resp.model_version)
                label = SWAP_CLASSES.index(resp.predictions[0].label)
            except grpc.RpcError as exc:
                code, version, label = int(exc.code().value[0]), -1, -1
            rows.append((sent, time.perf_counter() - t0, code, version, label, j))
            i += 1
            due = max(due + period, sent)  # one request in flight: never burst to catch up
    np.save(out_path, np.asarray(rows, dtype=np.float64).reshape(-1, 6))


def run_swap(plan: Plan, seed: int, tmp: Path) -> dict[str, Any]:
    """Swap safety: >= plan.swaps swaps under >= clients*rate req/s, vs the same load without swaps."""
    from service.models.served import ModelSlot

    slot = ModelSlot()
    slot.swap(build_served(swap_readout(seed, 1), 1))
    server = InProcessServer(slot)
    n_swap_blocks = (plan.swap_blocks + 1) // 2
    swapper = Swapper(slot, seed, 1, interval=n_swap_blocks * plan.block_seconds / plan.swaps)
    swapper.start()
    ctx = mp.get_context("spawn")  # fork after grpc started threads is unsafe
    ready, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    paths = [str(tmp / f"swap-client-{i}.npy") for i in range(plan.clients)]
    procs = [ctx.Process(target=swap_client, args=(f"127.0.0.1:{server.port}", plan.client_rate, i, seed,
                                                   ready, go, stop, paths[i]), daemon=True)
             for i in range(plan.clients)]
    blocks: list[tuple[str, float, float]] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=180)
        go.set()
        time.sleep(0.5)  # pacing settles; requests before the first block are not counted
        length = plan.block_seconds
        for b in range(plan.swap_blocks):
            start = time.monotonic()
            if b % 2 == 0:
                # A swap block lasts until its share of the swaps is done (longer if the CPU is
                # starved); the no-swap block after it lasts as long.
                quota = plan.swaps * (b // 2 + 1) // n_swap_blocks
                swapper.active.set()
                time.sleep(plan.block_seconds)
                while swapper.applied + swapper.refused < quota and time.monotonic() - start < 10 * length:
                    time.sleep(0.01)
                swapper.active.clear()
                blocks.append(("swaps", start, time.monotonic()))
                length = time.monotonic() - start
            else:
                time.sleep(length)
                blocks.append(("no_swaps", start, time.monotonic()))
        stop.set()
        for p in procs:
            p.join(60)
    finally:
        stop.set()
        swapper.halt.set()
        swapper.join(10)
        for p in procs:
            if p.is_alive():
                p.kill()
        server.close()
    clients = [np.load(p) for p in paths]
    return analyze_swap(plan, seed, clients, blocks, swapper)


def analyze_swap(plan: Plan, seed: int, clients: list[np.ndarray], blocks: list[tuple[str, float, float]],
                 swapper: Swapper) -> dict[str, Any]:
    """Failures, version order per client, label consistency per version, latency by condition."""
    backwards = [int(np.sum(np.diff(c[c[:, 2] == 0, 3]) < 0)) for c in clients]
    inconsistent = count_inconsistent(seed, clients)
    conditions: dict[str, Any] = {}
    for kind in ("swaps", "no_swaps"):
        spans = [(s, e) for k, s, e in blocks if k == kind]
        rows = np.concatenate([c[np.any([(c[:, 0] >= s) & (c[:, 0] < e) for s, e in spans], axis=0)]
                               for c in clients])
        seconds = sum(e - s for s, e in spans)
        ok = rows[:, 2] == 0
        conditions[kind] = {"requests": len(rows), "failed": int((~ok).sum()), "seconds": seconds,
                            "requests_per_s": len(rows) / seconds,
                            "versions_answered": len(np.unique(rows[ok, 3])),
                            "latency": summarize(rows[ok, 1])}
    in_swap_blocks = [t for t in swapper.swap_times if any(s <= t < e for k, s, e in blocks if k == "swaps")]
    p99s, p99n = conditions["swaps"]["latency"]["p99_ms"], conditions["no_swaps"]["latency"]["p99_ms"]
    every = np.concatenate(clients)
    return {
        "setup": {"server": "start_server in this process (asyncio thread); swapper thread in the "
                            "same process",
                  "clients": f"{plan.clients} spawned processes, one grpc channel each, one request in "
                             f"flight, paced at {plan.client_rate:g} req/s each",
                  "model": f"readout_to_onnx of a random Readout, d={D}, k={K_SWAP}; version v from seed v",
                  "blocks": [{"kind": k, "seconds": e - s} for k, s, e in blocks],
                  "load_generator": LOAD_GENERATOR_NOTE},
        "total_requests": len(every),
        "total_failed": int((every[:, 2] != 0).sum()),
        "requests_in_blocks": conditions["swaps"]["requests"] + conditions["no_swaps"]["requests"],
        "failed_in_blocks": conditions["swaps"]["failed"] + conditions["no_swaps"]["failed"],
        "version_went_backwards": any(backwards),
        "backward_steps_per_client": backwards,
        "responses_inconsistent_with_their_version": inconsistent,
        "swaps_applied": swapper.applied,
        "swaps_refused": swapper.refused,
        "swaps_in_swap_blocks": len(in_swap_blocks),
        "swaps_per_s": len(in_swap_blocks) / max(conditions["swaps"]["seconds"], 1e-9),
        "build_ms": {"p50": float(np.percentile(swapper.build_seconds, 50) * 1000),
                     "p99": float(np.percentile(swapper.build_seconds, 99) * 1000)},
        "conditions": conditions,
        "p99_ratio_swaps_over_no_swaps": p99s / p99n,
        "target_p99_ratio": TARGETS["swap_p99_ratio"],
    }


def count_inconsistent(seed: int, clients: list[np.ndarray]) -> int:
    """Successful responses whose top label differs from what their version's readout predicts."""
    X = {i: client_features(seed, i).astype(np.float64) for i in range(len(clients))}
    bad = 0
    answered: dict[int, list[tuple[int, np.ndarray]]] = {}
    for i, c in enumerate(clients):
        ok = c[c[:, 2] == 0]
        for version in np.unique(ok[:, 3]).astype(int):
            answered.setdefault(int(version), []).append((i, ok[ok[:, 3] == version]))
    for version, parts in answered.items():
        r = swap_readout(seed, version)
        for i, rows in parts:
            expected = r.scores(X[i][rows[:, 5].astype(int)]).argmax(axis=1)
            bad += int(np.sum(expected != rows[:, 4].astype(int)))
    return bad


# ---------------------------------------------------------------------------------------------
# 2. latency
# ---------------------------------------------------------------------------------------------
@contextmanager
def server_child(variant: str, mode: str = "inline") -> Iterator[str]:
    """``bench/grpc_latency.py --serve <variant> <mode>`` in a child process; yields its gRPC address."""
    with server_child_ports(variant, mode) as (addr, _):
        yield addr


@contextmanager
def server_child_ports(variant: str, mode: str = "inline") -> Iterator[tuple[str, str]]:
    """Like ``server_child``, yielding ``(gRPC address, HTTP host:port)`` of the same server process."""
    command = [sys.executable, str(ROOT / "bench" / "grpc_latency.py"), "--serve", variant, mode]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = [child.stdout.readline() if child.stdout else "" for _ in range(2)]
        if not all(line.strip().isdigit() for line in lines):
            raise RuntimeError(f"server child ({variant}) did not print its ports (exit {child.poll()})")
        yield f"127.0.0.1:{int(lines[0])}", f"127.0.0.1:{int(lines[1])}"
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def closed_loop(call: Callable[[int], Awaitable[Any]], *, concurrency: int, n: int, warmup: int,
                      seconds: float | None = None) -> tuple[np.ndarray, int, float]:
    """``concurrency`` tasks calling ``call(i)`` back to back until ``n`` calls are done.

    With ``seconds``, calls stop after that long instead (``n`` is then an upper bound).
    Returns (latencies in s of successful calls, failures, wall seconds). Warm-up calls come first
    and are not counted.
    """
    for i in range(warmup):
        await call(i)
    latencies: list[float] = []
    failures = 0
    remaining = [n]
    deadline = time.monotonic() + seconds if seconds is not None else float("inf")

    async def worker(w: int) -> None:
        nonlocal failures
        i = w
        while remaining[0] > 0 and time.monotonic() < deadline:
            remaining[0] -= 1
            start = time.perf_counter()
            try:
                await call(i)
                latencies.append(time.perf_counter() - start)
            except Exception:
                failures += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return np.asarray(latencies), failures, time.perf_counter() - start


async def eddy_v1_features(addr: str, concurrency: int, n: int, seed: int) -> dict[str, Any]:
    """eddy.v1 Predict(features) through one grpc.aio channel."""
    import grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    X = client_features(seed, 99, 16)
    requests = [pb.PredictRequest(features=pb.Features(values=row.tolist())) for row in X]
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        lat, failed, wall = await closed_loop(lambda i: stub.Predict(requests[i % len(requests)], timeout=5),
                                              concurrency=concurrency, n=n, warmup=200)
    return {"endpoint": "eddy.v1 Predict", "client": "grpc.aio, one channel", "concurrency": concurrency,
            "failed": failed, "requests_per_s": len(lat) / wall, "latency": summarize(lat)}


async def oip_features(addr: str, concurrency: int, n: int, seed: int) -> dict[str, Any]:
    """OIP v2 ModelInfer(FEATURES [1, 384]) through ``tritonclient.grpc.aio``."""
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc.aio import InferenceServerClient

    X = client_features(seed, 99, 16)
    inputs = []
    for row in X:
        tensor = InferInput("FEATURES", [1, D], "FP32")
        tensor.set_data_from_numpy(row[None, :])
        inputs.append([tensor])
    outputs = [InferRequestedOutput("LABEL"), InferRequestedOutput("PROBABILITY")]
    client = InferenceServerClient(url=addr)
    try:
        lat, failed, wall = await closed_loop(
            lambda i: client.infer("eddy", inputs[i % len(inputs)], outputs=outputs, client_timeout=5),
            concurrency=concurrency, n=n, warmup=200)
    finally:
        await client.close()
    return {"endpoint": "OIP v2 ModelInfer", "client": "tritonclient.grpc.aio, one client",
            "concurrency": concurrency, "failed": failed, "requests_per_s": len(lat) / wall,
            "latency": summarize(lat)}


async def rest_features(hostport: str, concurrency: int, n: int, seed: int, *, binary: bool) -> dict[str, Any]:
    """OIP v2 infer(FEATURES [1, 384]) over HTTP/REST, one keep-alive connection per concurrent caller.

    ``binary``: the unmodified ``tritonclient.http.aio`` with binary tensor data (a heavy client:
    aiohttp plus its own JSON work cost it ~3 ms a call here even at concurrency 1). Otherwise the
    JSON body as curl sends it, written whole by a lean asyncio HTTP/1.1 client (what wrk does), so
    the latency is the server's, as with the gRPC clients.
    """
    X = client_features(seed, 99, 16)
    if binary:
        import tritonclient.http.aio as tch

        inputs = []
        for row in X:
            tensor = tch.InferInput("FEATURES", [1, D], "FP32")
            tensor.set_data_from_numpy(row[None, :], binary_data=True)
            inputs.append([tensor])
        outputs = [tch.InferRequestedOutput("LABEL"), tch.InferRequestedOutput("PROBABILITY")]
        client = tch.InferenceServerClient(url=hostport, conn_limit=concurrency)
        try:
            lat, failed, wall = await closed_loop(
                lambda i: client.infer("eddy", inputs[i % len(inputs)], outputs=outputs),
                concurrency=concurrency, n=n, warmup=200)
        finally:
            await client.close()
        name, how = "OIP v2 REST infer (binary data)", "tritonclient.http.aio, one client"
    else:
        host, port = hostport.split(":")
        requests = []
        for row in X:
            body = json.dumps({"inputs": [{"name": "FEATURES", "shape": [1, D], "datatype": "FP32",
                                           "data": row.tolist()}]}).encode()
            requests.append(b"POST /v2/models/eddy/infer HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                            b"\r\nContent-Length: %d\r\n\r\n%s" % (hostport.encode(), len(body), body))
        pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        for _ in range(concurrency):
            pool.put_nowait(await asyncio.open_connection(host, int(port)))

        async def infer(i: int) -> bytes:
            reader, writer = await pool.get()
            try:
                writer.write(requests[i % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                answer = await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n")[0].decode())
                return answer
            finally:
                pool.put_nowait((reader, writer))

        try:
            lat, failed, wall = await closed_loop(infer, concurrency=concurrency, n=n, warmup=200)
        finally:
            while not pool.empty():
                pool.get_nowait()[1].close()
        name, how = "OIP v2 REST infer (JSON)", "asyncio HTTP/1.1 keep-alive, one connection per caller"
    return {"endpoint": name, "client": how, "concurrency": concurrency, "failed": failed,
            "requests_per_s": len(lat) / wall, "latency": summarize(lat)}


async def eddy_v1_text(addr: str, texts: list[str], n: int, seconds: float | None = None,
                       concurrency: int = 1) -> dict[str, Any]:
    """eddy.v1 Predict(text) at ``concurrency`` (``n`` requests, or as many as fit in ``seconds``)."""
    import grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    requests = [pb.PredictRequest(text=t) for t in texts]
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        lat, failed, wall = await closed_loop(lambda i: stub.Predict(requests[i % len(requests)], timeout=30),
                                              concurrency=concurrency, n=n, warmup=10, seconds=seconds)
    return {"endpoint": "eddy.v1 Predict(text)", "client": "grpc.aio, one channel", "concurrency": concurrency,
            "failed": failed, "requests_per_s": len(lat) / wall, "latency": summarize(lat)}


def banking77(split: str) -> list[tuple[str, str]]:
    """``(text, category)`` rows of banking77 ``split``; empty when the file is missing."""
    path = BANKING77 / f"{split}.csv"
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [(r["text"], r["category"]) for r in csv.DictReader(fh)]


def short_texts(seed: int, n: int = 64) -> list[str]:
    """Short banking questions (at most 10 words) for text latency."""
    rows = [t for t, _ in banking77("test") if len(t.split()) <= 10]
    if not rows:
        rows = ["I still have not received my new card", "how do I top up by bank transfer?",
                "why was I charged a fee for cash withdrawal", "my pin is blocked, please help"]
    rng = np.random.default_rng(seed)
    return [rows[i] for i in rng.permutation(len(rows))[:n]]


def run_latency(plan: Plan, seed: int, cluster: Cluster, *, while_learning: bool) -> dict[str, Any]:
    """Features at concurrency 8 (eddy.v1 and OIP v2), short text at concurrency 1 idle.

    With ``while_learning``, also short text against the learning daemon (``text_while_learning``).
    """
    out: dict[str, Any] = {"load_generator": LOAD_GENERATOR_NOTE,
                           "server": "separate child process (bench/grpc_latency.py --serve), grpc.aio, "
                                     "head d=384 k=77 run inline on the event loop",
                           "targets": {"features_c8_p99_ms": TARGETS["features_c8_p99_ms"],
                                       "text_c1_p99_ms": TARGETS["text_c1_p99_ms"]}}
    with server_child_ports("linear") as (addr, hostport):
        out["features_eddy_v1"] = asyncio.run(eddy_v1_features(addr, 8, plan.latency_requests, seed))
        out["features_oip_v2"] = asyncio.run(oip_features(addr, 8, plan.latency_requests, seed))
        out["features_rest_binary"] = asyncio.run(rest_features(hostport, 8, plan.latency_requests, seed,
                                                                binary=True))
        out["features_rest_json"] = asyncio.run(rest_features(hostport, 8, plan.latency_requests, seed,
                                                              binary=False))
    grpc_p99 = out["features_oip_v2"]["latency"]["p99_ms"]
    out["rest_over_grpc_p99_ratio"] = {
        "binary": out["features_rest_binary"]["latency"]["p99_ms"] / grpc_p99,
        "json": out["features_rest_json"]["latency"]["p99_ms"] / grpc_p99,
        "note": ("OIP v2 over HTTP/REST p99 divided by OIP v2 over gRPC (tritonclient.grpc.aio) p99, same "
                 "server process, same run; json: lean HTTP client, binary: tritonclient.http.aio")}
    with server_child("text") as addr:
        out["text_idle"] = asyncio.run(eddy_v1_text(addr, short_texts(seed), plan.text_requests))
    out["text_idle"]["server"] = "child process, MiniLM ONNX backbone (1 thread), idle"
    # Concurrency 8 with the daemon's encoder threads: requests sharing encoder calls vs each alone.
    for key, mode in (("text_c8_coalesced", "inline"), ("text_c8_per_request", "inline-nocoalesce")):
        with server_child("text-default", mode) as addr:
            out[key] = asyncio.run(eddy_v1_text(addr, short_texts(seed), 4 * plan.text_requests, concurrency=8))
        out[key]["server"] = ("child process, MiniLM ONNX backbone (default threads), "
                              f"serving.coalesce_texts={mode == 'inline'}")
    if while_learning:
        out["text_while_learning"] = daemon_section(lambda: text_while_learning(plan, seed, cluster))
    return out


def text_while_learning(plan: Plan, seed: int, cluster: Cluster) -> dict[str, Any]:
    """Short-text Predict at concurrency 1 against the real daemon while it learns text at full speed.

    A backlog is produced first and more events keep coming (about 300/s, more than the learner
    embeds on this machine), so the learner never waits for input during the measurement.
    """
    texts = short_texts(seed)
    daemon = cluster.text_daemon(seed)
    rows = banking77("train") or [(t, "x") for t in texts]
    producer = cluster.producer()
    stop = threading.Event()
    produced = [0]

    def produce() -> None:
        from service.core.events import encode

        i = 0
        while not stop.is_set():
            for _ in range(2000 if i == 0 else 30):
                text, label = rows[i % len(rows)]
                producer.send(daemon.topic, encode(f"load-{uuid.uuid4().hex}", label, text=text))
                i += 1
            produced[0] = i
            stop.wait(0.1)

    first, load_start = scrape(daemon.proc), time.monotonic()
    thread = threading.Thread(target=produce, name="bench-producer", daemon=True)
    thread.start()
    try:
        daemon.proc.wait_metric(LEARNED, lambda v: v >= first.get(LEARNED, 0.0) + 100, timeout=180)
        before, start = scrape(daemon.proc), time.monotonic()
        result = asyncio.run(eddy_v1_text(daemon.proc.addr, texts, 1_000_000, seconds=plan.learning_seconds))
        after, seconds = scrape(daemon.proc), time.monotonic() - start
    finally:
        stop.set()
        thread.join(10)
        producer.flush()
    learned = after.get(LEARNED, 0.0) - before.get(LEARNED, 0.0)
    since_load = (after.get(LEARNED, 0.0) - first.get(LEARNED, 0.0)) / (time.monotonic() - load_start)
    # A text batch (up to 512 events) can take longer than the window, so both rates are given.
    result.update(server="real daemon (python -m service.app.cli serve, role all) learning text events",
                  measured_seconds=seconds, learner_events_per_s_during=learned / seconds,
                  learner_events_per_s_since_load_started=since_load,
                  produced_events=produced[0], daemon_timings=timing_delta(before, after),
                  daemon_log_warnings=log_warnings(daemon.proc),
                  consumer_lag_at_end=after.get('eddy_consumer_lag{partition="0"}'))
    return result


# ---------------------------------------------------------------------------------------------
# the real broker and daemon (parts 2 and 3)
# ---------------------------------------------------------------------------------------------
@dataclass
class RunningDaemon:
    """A daemon child process and the topic it consumes."""

    proc: Any  # tests.integration.daemon.DaemonProc
    topic: str
    env_overrides: dict[str, str]


class Cluster:
    """One real Kafka broker (on a free port, data in ``tmp``) and daemons, started on first use."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.kafka: Any = None
        self.daemons: dict[str, RunningDaemon] = {}
        self._producer: Any = None

    def bootstrap(self) -> str:
        """The broker's address, starting it if needed."""
        if self.kafka is None:
            from service.tools.broker import LocalKafka, free_port

            self.kafka = LocalKafka(port=free_port(), data_dir=self.tmp / "kafka")
            self.kafka.start(timeout=180)
        return str(self.kafka.bootstrap)

    def producer(self) -> Any:
        """A kafka-python producer sending at once (``linger_ms=0``)."""
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap(), linger_ms=0, acks=1)
        return self._producer

    def daemon(self, name: str, **overrides: str) -> RunningDaemon:
        """``python -m service.app.cli serve`` on its own topic, default settings plus ``overrides``."""
        if name not in self.daemons:
            from service.app.config import KafkaSettings
            from tests.integration.daemon import daemon_env, start_daemon

            tmp = self.tmp / name
            tmp.mkdir(parents=True, exist_ok=True)
            topic = f"bench.{name}.{uuid.uuid4().hex[:8]}"
            # daemon_env shortens Kafka session timeouts for tests; the benchmark runs the defaults.
            k = KafkaSettings.model_validate({})
            env = daemon_env(tmp, self.bootstrap(), topic, **{
                "EDDY_KAFKA__SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
                "EDDY_KAFKA__HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms), **overrides})
            self.daemons[name] = RunningDaemon(start_daemon(tmp, env, name=name), topic, overrides)
        return self.daemons[name]

    def text_daemon(self, seed: int) -> RunningDaemon:
        """The text daemon, bootstrapped with two banking77 classes so a model is served."""
        fresh = "text" not in self.daemons
        daemon = self.daemon("text")
        if fresh:
            rows = banking77("train")
            cats = sorted({c for _, c in rows})[:2] if rows else []
            texts = {c: [t for t, cc in rows if cc == c][:20] for c in cats}
            if not texts:
                texts = {"cards": ["my card was declined", "card payment failed"],
                         "travel": ["book a flight to paris", "hotel for my trip"]}
            produce_texts(self.producer(), daemon.topic, texts, prefix="boot")
            wait_served(daemon.proc.addr, timeout=240)
        return daemon

    def stop_daemon(self, name: str) -> None:
        """Stop daemon ``name`` (if running) so it no longer competes for the CPU."""
        daemon = self.daemons.pop(name, None)
        if daemon is not None:
            daemon.proc.stop()

    def close(self) -> None:
        """Stop every daemon, the producer, then the broker."""
        for name in list(self.daemons):
            self.stop_daemon(name)
        if self._producer is not None:
            self._producer.close(5)
        if self.kafka is not None:
            self.kafka.stop()


def daemon_section(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a daemon-backed measurement; if the daemon cannot start or run, say it is pending."""
    try:
        return fn()
    except Exception as exc:  # the daemon is under construction: report, keep the other numbers
        text = f"{type(exc).__name__}: {exc}"
        print(f"  daemon-backed measurement not available: {text[:300]}", flush=True)
        return {"status": "pending", "reason": text[-3000:]}


def produce_texts(producer: Any, topic: str, texts: dict[str, list[str]], *, prefix: str) -> None:
    """Send ``{label: [texts]}`` as text events and flush."""
    from service.core.events import encode

    for label, items in texts.items():
        for i, text in enumerate(items):
            producer.send(topic, encode(f"{prefix}-{label}-{i}", label, text=text))
    producer.flush()


def wait_served(addr: str, timeout: float) -> int:
    """Block until the server at ``addr`` serves a model; return its version."""
    import grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            try:
                return int(stub.ModelInfo(pb.ModelInfoRequest(), timeout=2).model_version)
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"no model served at {addr} within {timeout:.0f} s")


DAEMON_TIMINGS = ("eddy_learn_batch_seconds", "eddy_embed_seconds", "eddy_export_seconds",
                  "eddy_snapshot_seconds", "eddy_label_to_servable_seconds")
LEARNED = 'eddy_events_total{result="learned"}'


def scrape(proc: Any, attempts: int = 3) -> dict[str, float]:
    """Every sample of the daemon's /metrics as ``{"name{labels}": value}`` (empty if it never answers)."""
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read().decode()
            break
        except OSError:
            if attempt == attempts - 1:
                return {}
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


LOG_WARNINGS = {"kafka_session_expired": "Heartbeat session expired",
                "offset_commit_failed": "offset commit to Kafka failed",
                "export_rejected": "export rejected"}


def log_warnings(proc: Any) -> dict[str, int]:
    """How often the daemon's log shows each of ``LOG_WARNINGS`` so far (stalls leave these marks)."""
    text = proc.log()
    return {name: text.count(needle) for name, needle in LOG_WARNINGS.items()}


def timing_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Count and mean seconds of the daemon's timing histograms between two scrapes."""
    out: dict[str, Any] = {}
    for name in DAEMON_TIMINGS:
        n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        out[name.removeprefix("eddy_")] = {"count": int(n), "mean_s": total / n if n else None}
    out["events_learned"] = int(after.get(LEARNED, 0.0) - before.get(LEARNED, 0.0))
    return out


# ---------------------------------------------------------------------------------------------
# 3. freshness
# ---------------------------------------------------------------------------------------------
def poll_until(stub: Any, request: Any, label: str, *, start: float, timeout: float,
               every: float = 0.02) -> dict[str, Any]:
    """Send ``request`` every ``every`` s until the top label is ``label``; seconds since ``start``."""
    import grpc

    polls, due, slowest = 0, time.monotonic(), 0.0
    while time.monotonic() - start < timeout:
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        due = time.monotonic() + every
        polls += 1
        sent = time.monotonic()
        try:
            resp = stub.Predict(request, timeout=2)
        except grpc.RpcError:
            continue
        finally:
            slowest = max(slowest, time.monotonic() - sent)
        if resp.predictions and resp.predictions[0].label == label:
            return {"seconds": time.monotonic() - start, "polls": polls, "slowest_poll_s": slowest,
                    "model_version": int(resp.model_version)}
    return {"seconds": None, "polls": polls, "slowest_poll_s": slowest, "model_version": None}


def freshness_features(plan: Plan, seed: int, cluster: Cluster) -> dict[str, Any]:
    """New feature classes, one after another: produce ~20 events, poll Predict(center) every 20 ms."""
    import grpc

    from service.core.events import encode
    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    daemon = cluster.daemon("features")
    producer = cluster.producer()
    rng = np.random.default_rng([seed, 7])
    n = plan.fresh_feature_classes + 2
    centers = rng.normal(size=(n, D))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def send_class(c: int, label: str) -> None:
        X = centers[c] + 0.35 * rng.normal(size=(plan.events_per_class, D)) / np.sqrt(D)
        for i, row in enumerate(X.astype(np.float32)):
            producer.send(daemon.topic, encode(f"{label}-{i}", label, features=row.tolist()))
        producer.flush()

    for c in range(2):  # bootstrap: a model must be served before the first measured class
        send_class(c, f"boot-{c}")
    wait_served(daemon.proc.addr, timeout=240)
    results = []
    before = scrape(daemon.proc)
    with grpc.insecure_channel(daemon.proc.addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for c in range(2, n):
            label = f"fresh-{c - 2:03d}"
            request = pb.PredictRequest(features=pb.Features(values=centers[c].astype(np.float32).tolist()))
            start = time.monotonic()
            send_class(c, label)
            produced = time.monotonic() - start
            results.append({"label": label, "produce_seconds": produced,
                            **poll_until(stub, request, label, start=start, timeout=20)})
    out = freshness_summary(results, "features", daemon, plan)
    out["daemon_timings"] = timing_delta(before, scrape(daemon.proc))
    out["daemon_log_warnings"] = log_warnings(daemon.proc)
    out["query"] = "Predict(features) with the class center (events are center + noise)"
    return out


def freshness_text(plan: Plan, seed: int, cluster: Cluster) -> dict[str, Any]:
    """New banking77 categories as text events; poll Predict(text) with one of the class's texts."""
    import grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    rows = banking77("train")
    if not rows:
        return {"status": "skipped", "reason": f"banking77 not found at {BANKING77}"}
    daemon = cluster.text_daemon(seed)
    producer = cluster.producer()
    categories = sorted({c for _, c in rows})[2:]  # the first two bootstrapped the daemon
    rng = np.random.default_rng([seed, 11])
    chosen = [categories[i] for i in rng.permutation(len(categories))[:plan.fresh_text_classes]]
    results = []
    before = scrape(daemon.proc)
    with grpc.insecure_channel(daemon.proc.addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for cat in chosen:
            texts = [t for t, c in rows if c == cat][:plan.events_per_class]
            request = pb.PredictRequest(text=texts[0])
            start = time.monotonic()
            produce_texts(producer, daemon.topic, {cat: texts}, prefix="fresh")
            produced = time.monotonic() - start
            results.append({"label": cat, "produce_seconds": produced,
                            **poll_until(stub, request, cat, start=start, timeout=30)})
    out = freshness_summary(results, "text", daemon, plan)
    out["daemon_timings"] = timing_delta(before, scrape(daemon.proc))
    out["daemon_log_warnings"] = log_warnings(daemon.proc)
    out["query"] = "Predict(text) with the first of the class's produced texts"
    return out


def freshness_summary(results: list[dict[str, Any]], kind: str, daemon: RunningDaemon,
                      plan: Plan) -> dict[str, Any]:
    """p50/p99 of the answered classes, how many never answered, and the raw values."""
    seconds = [r["seconds"] for r in results if r["seconds"] is not None]
    pct = np.percentile(seconds, [50, 99]) if seconds else [float("nan")] * 2
    return {"input": kind, "classes": len(results), "events_per_class": plan.events_per_class,
            "answered": len(seconds), "missed": len(results) - len(seconds),
            "p50_s": float(pct[0]), "p99_s": float(pct[1]), "max_s": max(seconds, default=float("nan")),
            "poll_interval_s": 0.02,
            "daemon": "python -m service.app.cli serve --role all, default settings except ports/dirs/topic"
                      + (f" and {daemon.env_overrides}" if daemon.env_overrides else ""),
            "targets": {"p50_s": TARGETS["freshness_p50_s"], "p99_s": TARGETS["freshness_p99_s"]},
            "per_class": results}


def run_freshness(plan: Plan, seed: int, cluster: Cluster) -> dict[str, Any]:
    """Freshness of new classes, features then text (one daemon each, one at a time)."""
    features = daemon_section(lambda: freshness_features(plan, seed, cluster))
    cluster.stop_daemon("features")  # so it does not compete with the text daemon
    return {"definition": "time from the first producer.send of a new class's labeled events to the first "
                          "Predict (polled every 20 ms, from this process) whose top label is that class",
            "features": features,
            "text": daemon_section(lambda: freshness_text(plan, seed, cluster))}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def table_rows(parts: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(measure, value, target)`` rows for the printed table."""
    rows: list[tuple[str, str, str]] = []
    s = parts.get("swap")
    if s:
        c = s["conditions"]
        rows += [("swap: requests (in blocks) / failed",
                  f"{s['requests_in_blocks']} / {s['failed_in_blocks']}", "failed = 0"),
                 ("swap: all requests / failed", f"{s['total_requests']} / {s['total_failed']}",
                  "failed = 0"),
                 ("swap: swaps applied (rate)", f"{s['swaps_in_swap_blocks']} ({s['swaps_per_s']:.0f}/s)",
                  ">= 1000"),
                 ("swap: version went backwards", str(s["version_went_backwards"]), "never"),
                 ("swap: answers inconsistent with version",
                  str(s["responses_inconsistent_with_their_version"]), "0"),
                 ("swap: load with / without swaps (req/s)",
                  f"{c['swaps']['requests_per_s']:.0f} / {c['no_swaps']['requests_per_s']:.0f}", ">= 200"),
                 ("swap: p50 with / without (ms)",
                  f"{c['swaps']['latency']['p50_ms']:.2f} / {c['no_swaps']['latency']['p50_ms']:.2f}", ""),
                 ("swap: p99 with / without (ms)",
                  f"{c['swaps']['latency']['p99_ms']:.2f} / {c['no_swaps']['latency']['p99_ms']:.2f}", ""),
                 ("swap: p99 ratio swaps / no swaps", f"{s['p99_ratio_swaps_over_no_swaps']:.2f}", "<= 1.5")]
    lat = parts.get("latency")
    if lat:
        for key, name, target in (("features_eddy_v1", "features c=8 eddy.v1", "p99 <= 5 ms"),
                                  ("features_oip_v2", "features c=8 OIP v2", "p99 <= 5 ms"),
                                  ("features_rest_binary", "features c=8 OIP v2 REST binary", ""),
                                  ("features_rest_json", "features c=8 OIP v2 REST JSON", ""),
                                  ("text_idle", "text c=1 idle", "p99 <= 60 ms"),
                                  ("text_c8_coalesced", "text c=8, requests share encoder calls", ""),
                                  ("text_c8_per_request", "text c=8, one encoder call per request", ""),
                                  ("text_while_learning", "text c=1 while learning", "p99 <= 60 ms")):
            r = lat.get(key, {})
            if "latency" in r:
                m = r["latency"]
                rows.append((f"latency: {name} p50/p99/p99.9 (ms)",
                             f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f} / {m['p999_ms']:.2f}"
                             f"  ({r['requests_per_s']:.0f} req/s, {r['failed']} failed)", target))
            else:
                rows.append((f"latency: {name}", r.get("status", "not run"), target))
        ratio = lat.get("rest_over_grpc_p99_ratio")
        if ratio:
            rows.append(("latency: features c=8 p99 REST / gRPC (OIP v2)",
                         f"{ratio['binary']:.2f} binary, {ratio['json']:.2f} JSON", ""))
    fr = parts.get("freshness")
    if fr:
        for key in ("features", "text"):
            r = fr.get(key, {})
            if "p50_s" in r:
                rows.append((f"freshness: {key} p50 / p99 (s)",
                             f"{r['p50_s']:.3f} / {r['p99_s']:.3f}  ({r['answered']}/{r['classes']} classes)",
                             "p50 <= 1, p99 <= 2"))
            else:
                rows.append((f"freshness: {key}", r.get("status", "not run"), "p50 <= 1, p99 <= 2"))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """Aligned three-column table."""
    w0 = max((len(r[0]) for r in rows), default=10)
    w1 = max((len(r[1]) for r in rows), default=10)
    print(f"\n{'measure':<{w0}}  {'value':<{w1}}  target")
    for name, value, target in rows:
        print(f"{name:<{w0}}  {value:<{w1}}  {target}")
    print(f"(load generator: {LOAD_GENERATOR_NOTE})")


def plot_latency(parts: dict[str, Any], path: Path) -> None:
    """Three CDF panels: swaps vs none, features c=8 per endpoint, text c=1 idle vs learning."""

    def curve(section: dict[str, Any] | None) -> tuple[list[float], list[float]]:
        cdf = ((section or {}).get("latency") or {}).get("cdf")
        return (cdf["ms"], cdf["level"]) if cdf else ([], [])

    fig, (a, b, c) = plots.figure(3, width=5.0, height=4.0)
    conds = (parts.get("swap") or {}).get("conditions", {})
    plots.cdf(a, {"with swaps": curve(conds.get("swaps")), "without swaps": curve(conds.get("no_swaps"))},
              xlabel="latency (ms)", title="eddy.v1 Predict(features) while swapping", log_x=True)
    lat = parts.get("latency") or {}
    plots.cdf(b, {"eddy.v1": curve(lat.get("features_eddy_v1")), "OIP v2": curve(lat.get("features_oip_v2")),
                  "OIP v2 REST (binary)": curve(lat.get("features_rest_binary")),
                  "OIP v2 REST (JSON)": curve(lat.get("features_rest_json"))},
              xlabel="latency (ms)", title="features, concurrency 8", log_x=True)
    plots.targets(b, {"p99 target 5 ms": TARGETS["features_c8_p99_ms"]})
    plots.cdf(c, {"idle": curve(lat.get("text_idle")),
                  "while learning": curve(lat.get("text_while_learning"))},
              xlabel="latency (ms)", title="short text, concurrency 1", log_x=True)
    plots.targets(c, {"p99 target 60 ms": TARGETS["text_c1_p99_ms"]})
    plots.save(fig, path)


def plot_freshness(parts: dict[str, Any], path: Path) -> None:
    """CDF of new-class freshness, features and text, with the targets."""
    fr = parts.get("freshness") or {}
    curves = {}
    for key in ("features", "text"):
        per_class = fr.get(key, {}).get("per_class", [])
        seconds = sorted(r["seconds"] for r in per_class if r["seconds"] is not None)
        curves[key] = (seconds, [(i + 1) / len(seconds) for i in range(len(seconds))])
    fig, (ax,) = plots.figure(1, width=6.0, height=4.0)
    plots.cdf(ax, curves, xlabel="seconds from first produce to first correct Predict",
              title="freshness of new classes (real daemon + broker)", log_x=True)
    plots.targets(ax, {"p50 target": TARGETS["freshness_p50_s"], "p99 target": TARGETS["freshness_p99_s"]})
    plots.save(fig, path)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts, print the table, write JSON and plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (about 3 minutes)")
    parser.add_argument("--part", choices=["swap", "latency", "freshness", "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--swaps", type=int, help="override the number of swaps")
    parser.add_argument("--block-seconds", type=float, help="override the length of a swap-part block")
    parser.add_argument("--keep-work", action="store_true", help="keep the work dir (broker data, daemon logs)")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. a runner's timeout) unwinds like Ctrl-C, so the broker JVM and the daemons
    # this run started are stopped by the ``finally`` below instead of being orphaned.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    plan = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("swaps", args.swaps), ("block_seconds", args.block_seconds))
                 if v is not None}
    plan = Plan(**{**asdict(plan), **overrides})
    parts_to_run = ["swap", "latency", "freshness"] if args.part == "all" else [args.part]
    out_json = args.results_dir / "serving.json"
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    run_info = {"command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/serving.py",
                                                               *(sys.argv[1:] if argv is None else argv)]),
                "quick": args.quick, "plan": asdict(plan), "seed": args.seed,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info()}
    parts: dict[str, Any] = dict(previous.get("parts", {}))
    started = time.monotonic()
    prefix = "eddy-bench-serving-"
    work: Any = (contextlib.nullcontext(tempfile.mkdtemp(prefix=prefix)) if args.keep_work
                 else tempfile.TemporaryDirectory(prefix=prefix))
    with work as tmp_name:
        tmp = Path(tmp_name)
        if args.keep_work:
            print(f"work dir (kept): {tmp}", flush=True)
        cluster = Cluster(tmp)
        try:
            for part in parts_to_run:
                print(f"== {part}", flush=True)
                t0 = time.monotonic()
                if part == "swap":
                    result = run_swap(plan, args.seed, tmp)
                elif part == "latency":  # with freshness too, its learning case runs after freshness
                    result = run_latency(plan, args.seed, cluster, while_learning="freshness" not in parts_to_run)
                else:
                    result = run_freshness(plan, args.seed, cluster)
                result["run"] = {**run_info, "seconds": time.monotonic() - t0}
                parts[part] = result
            if {"latency", "freshness"} <= set(parts_to_run):
                # Last: the learning load leaves a backlog that would slow any later measurement.
                print("== latency: text while learning", flush=True)
                t0 = time.monotonic()
                parts["latency"]["text_while_learning"] = daemon_section(
                    lambda: text_while_learning(plan, args.seed, cluster))
                parts["latency"]["run"]["seconds"] += time.monotonic() - t0
        finally:
            cluster.close()
    doc = {"benchmark": "serving", "load_generator": LOAD_GENERATOR_NOTE, "machine_note": MACHINE_NOTE,
           "last_run": {**run_info, "parts": parts_to_run, "seconds": time.monotonic() - started},
           "targets": TARGETS, "parts": parts}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1, default=float))
    plot_latency(parts, args.results_dir / "serving_latency.png")
    plot_freshness(parts, args.results_dir / "freshness.png")
    print_table(table_rows(parts))
    print(f"wrote {out_json} and the PNGs in {args.results_dir} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
