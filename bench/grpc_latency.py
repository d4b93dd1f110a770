"""Predict latency through the real gRPC server at a fixed client concurrency.

The server runs in a child process (its own GIL), the client is one grpc.aio channel with
``--concurrency`` tasks each sending Predict back to back. Variants: a linear head (d=384, k=77),
a ridge head with a 2048-wide random expansion, and text through the real MiniLM backbone; each with
the head run inline on the event loop or in the default thread pool.

    .venv/bin/python bench/grpc_latency.py            # table + bench/results/grpc_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D, K = 384, 77


def build_model(variant: str, backbone: Any) -> Any:
    from learner.export import readout_to_onnx
    from learner.heads.base import Readout
    from service.models.served import ServedModel, make_session

    rng = np.random.default_rng(0)
    projection = rng.normal(size=(2048, D)).astype(np.float32) / np.sqrt(D) if variant == "expanded" else None
    p = 2048 if projection is not None else D
    readout = Readout(
        classes=tuple(f"intent_{i}" for i in range(K)),
        weight=rng.normal(size=(p, K)).astype(np.float32),
        bias=np.zeros(K, np.float32),
        temperature=1.0,
        projection=projection,
    )
    meta = {"classes": json.dumps(list(readout.classes)), "model_version": "1", "head_kind": "ridge"}
    session = make_session(readout_to_onnx(readout, metadata=meta).SerializeToString())
    return ServedModel.from_session(session, version=1, meta=meta, backbone=backbone)


async def serve(variant: str, mode: str) -> None:
    from service.models.served import ModelSlot
    from service.serving.grpc import common
    from service.serving.grpc.server import start_server, stop_server

    # MODE: inline | executor, with "-nocoalesce" to embed each text request on its own.
    common.Predictor.__init__.__kwdefaults__["features_inline"] = mode.startswith("inline")
    backbone = None
    if variant.startswith("text"):
        from learner.backbone import load_backbone

        # "text": one encoder thread (the c=1 latency numbers); "text-default": the daemon's default.
        backbone = load_backbone(threads=1 if variant == "text" else 0, cache_dir=ROOT / ".eddy/cache")
    slot = ModelSlot()
    slot.swap(build_model("linear" if variant.startswith("text") else variant, backbone))
    server, port = await start_server(
        slot,
        host="127.0.0.1",
        port=0,
        model_name="eddy",
        max_message_bytes=4 << 20,
        max_batch=1024,
        max_text_chars=10_000,
        admin=None,
        admin_token=None,
        predict_token=None,
        tls_cert=None,
        tls_key=None,
        coalesce_texts=not mode.endswith("-nocoalesce"),
    )
    # OIP v2 over HTTP/REST beside it, over the same slot (bench/serving.py compares the two).
    from service.serving.grpc.common import Limits, Predictor
    from service.serving.grpc.oip_v2 import OipServicer
    from service.serving.rest.app import start_rest, stop_rest

    predictor = Predictor(slot, Limits(max_batch=1024, max_text_chars=10_000),
                          coalesce_texts=not mode.endswith("-nocoalesce"))
    rest, http_port = await start_rest(OipServicer(predictor, "eddy"), host="127.0.0.1", port=0,
                                       max_body_bytes=4 << 20, predict_token=None, admin_token=None)
    print(port, flush=True)
    print(http_port, flush=True)  # a second line: the HTTP port
    await asyncio.get_running_loop().run_in_executor(
        None, sys.stdin.readline
    )  # until the parent closes stdin
    await stop_server(server, 1.0)
    await stop_rest(rest)


async def drive(port: int, variant: str, concurrency: int, requests: int) -> list[float]:
    import grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    rng = np.random.default_rng(1)
    if variant == "text":
        texts = [
            "I still have not received my new card",
            "how do I top up by bank transfer?",
            "why was I charged a fee for cash withdrawal",
            "my pin is blocked, please help",
        ]
        reqs = [pb.PredictRequest(text=t) for t in texts]
    else:
        reqs = [
            pb.PredictRequest(features=pb.Features(values=rng.normal(size=D).tolist())) for _ in range(16)
        ]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        for r in reqs * 10:  # warm-up
            await stub.Predict(r)
        remaining = [requests]

        async def worker(i: int) -> None:
            j = i
            while remaining[0] > 0:
                remaining[0] -= 1
                start = time.perf_counter()
                await stub.Predict(reqs[j % len(reqs)])
                latencies.append(time.perf_counter() - start)
                j += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies


def run_case(variant: str, mode: str, concurrency: int, requests: int) -> dict[str, Any]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", variant, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        start = time.perf_counter()
        lat = np.array(asyncio.run(drive(port, variant, concurrency, requests))) * 1000
        wall = time.perf_counter() - start
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(30)
    return {
        "variant": variant,
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(lat),
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "rps": len(lat) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", nargs=2, metavar=("VARIANT", "MODE"))
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client concurrencies")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--variants", default="linear,expanded,text")
    parser.add_argument("--modes", default="inline,executor")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    rows = []
    cases = [(v, m, int(c)) for v in args.variants.split(",") for m in args.modes.split(",")
             for c in args.concurrency.split(",")]
    for variant, mode, concurrency in cases:
        n = args.requests // 4 if variant == "text" else args.requests
        rows.append(run_case(variant, mode, concurrency, n))
        r = rows[-1]
        print(
            f"{r['variant']:9} {r['mode']:8} c={r['concurrency']} n={r['requests']:5} "
            f"p50={r['p50_ms']:.2f}ms p90={r['p90_ms']:.2f}ms p99={r['p99_ms']:.2f}ms "
            f"max={r['max_ms']:.1f}ms rps={r['rps']:.0f}",
            flush=True,
        )
    import grpc
    import onnxruntime

    print("server: child process, grpc.aio; client: one grpc.aio channel, <c> tasks back to back")
    out = {
        "rows": rows,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "grpcio": grpc.__version__,
            "onnxruntime": onnxruntime.__version__,
            "load_avg": os.getloadavg(),
        },
    }
    path = ROOT / "bench/results/grpc_latency.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
