"""Short requests' latency while a big request runs: text slicing and off-loop answers (issue 14).

The real gRPC server runs in a child process (its own GIL) with the real MiniLM backbone and a
linear head (d=384, 77 classes). One client sends single short texts back to back (Predict,
top_k=1) and records every latency; meanwhile another sends big requests:

- ``text``: a PredictBatch of ``--texts`` long texts (900 characters each, past the encoder's 128
  tokens), once with the default ``serving.embed_slice_chars`` (the big batch is embedded in slices
  taking turns with the short requests) and once with slicing off (one encoder call for the whole
  batch, as before issue 14);
- ``top_k``: PredictBatch and OIP ModelInfer of 1,024 feature rows with top_k=10^9 against 3,000
  classes, refused (RESOURCE_EXHAUSTED) or answered off the event loop.

Prints the short client's p50/p99/max before and during, and each big request's time; writes
bench/results/big_requests.json.

    .venv/bin/python bench/big_requests.py [--quick] [--texts 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D = 384
SHORT = "my card has not arrived yet"
LONG = ("I ordered a replacement card three weeks ago after the old one expired and it still has not "
        "arrived, the app shows it as dispatched but nothing came in the post, can you check? ") * 5


def build_model(classes: int, backbone: Any) -> Any:
    from learner.export import readout_to_onnx
    from learner.heads.base import Readout
    from service.models.served import ServedModel, make_session

    rng = np.random.default_rng(0)
    readout = Readout(classes=tuple(f"intent_{i:04d}" for i in range(classes)),
                      weight=rng.normal(size=(D, classes)).astype(np.float32),
                      bias=np.zeros(classes, np.float32), temperature=1.0)
    meta = {"classes": json.dumps(list(readout.classes)), "model_version": "1", "head_kind": "ridge"}
    session = make_session(readout_to_onnx(readout, metadata=meta).SerializeToString())
    return ServedModel.from_session(session, version=1, meta=meta, backbone=backbone)


async def serve(classes: int, slice_chars: int) -> None:
    from learner.backbone import load_backbone
    from service.models.served import ModelSlot
    from service.serving.grpc.server import start_server, stop_server

    backbone = load_backbone(threads=0, cache_dir=ROOT / ".eddy/cache")
    slot = ModelSlot()
    slot.swap(build_model(classes, backbone))
    server, port = await start_server(
        slot, host="127.0.0.1", port=0, model_name="eddy", max_message_bytes=4 << 20, max_batch=1024,
        max_text_chars=10_000, admin=None, admin_token=None, predict_token=None, tls_cert=None, tls_key=None,
        max_top_k=1_000_000, max_request_chars=2_000_000, embed_slice_chars=slice_chars)
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until stdin closes
    await stop_server(server, 1.0)


def short_client(port: int, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    import grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        while not stop.is_set():
            start = time.perf_counter()
            stub.Predict(pb.PredictRequest(text=SHORT), timeout=120)
            out.append((start, time.perf_counter() - start))
            time.sleep(0.01)


def big_calls(kind: str, texts: int) -> list[tuple[str, Any, str, Any]]:
    """(label, stub class, method name, request) of the big requests of ``kind``."""
    from tritonclient.grpc import service_pb2 as oip_pb
    from tritonclient.grpc import service_pb2_grpc as oip_grpc

    from service.serving.grpc.gen.eddy.v1 import inference_pb2 as pb
    from service.serving.grpc.gen.eddy.v1 import inference_pb2_grpc as pb_grpc

    if kind == "text":
        return [("PredictBatch texts", pb_grpc.InferenceStub, "PredictBatch",
                 pb.PredictBatchRequest(texts=[LONG] * texts))]
    X = np.random.default_rng(1).normal(size=(1024, D)).astype("<f4")
    request = oip_pb.ModelInferRequest(model_name="eddy", raw_input_contents=[X.tobytes()])
    request.inputs.add(name="FEATURES", datatype="FP32", shape=[1024, D])
    request.parameters["top_k"].int64_param = 10**9
    rows = [pb.Features(values=x.tolist()) for x in X]
    return [("PredictBatch top_k=1e9", pb_grpc.InferenceStub, "PredictBatch",
             pb.PredictBatchRequest(features=rows, top_k=10**9)),
            ("OIP ModelInfer top_k=1e9", oip_grpc.GRPCInferenceServiceStub, "ModelInfer", request),
            ("PredictBatch top_k=100", pb_grpc.InferenceStub, "PredictBatch",
             pb.PredictBatchRequest(features=rows, top_k=100))]


def run_case(name: str, kind: str, classes: int, slice_chars: int, texts: int) -> dict[str, Any]:
    import grpc

    child = subprocess.Popen([sys.executable, __file__, "--serve", str(classes), str(slice_chars)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        stop, samples = threading.Event(), []
        thread = threading.Thread(target=short_client, args=(port, stop, samples))
        thread.start()
        time.sleep(3)  # idle baseline (and warm-up)
        big_start = time.perf_counter()
        bigs = []
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            for label, stub_cls, name, request in big_calls(kind, texts):
                method = getattr(stub_cls(ch), name)
                start = time.perf_counter()
                try:
                    method(request, timeout=600)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                bigs.append({"request": label, "code": code, "seconds": time.perf_counter() - start})
        big_end = time.perf_counter()
        time.sleep(1)
        stop.set()
        thread.join(130)
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(60)
    idle = np.array([s for t, s in samples if t < big_start - 0.5][2:]) * 1000
    during = np.array([s for t, s in samples if big_start <= t <= big_end]) * 1000

    def stats(a: np.ndarray) -> dict[str, float]:
        if not len(a):
            return {"n": 0}
        return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                "max_ms": float(a.max())}

    row = {"case": name, "kind": kind, "classes": classes, "embed_slice_chars": slice_chars,
           "big": bigs, "short_idle": stats(idle), "short_during": stats(during)}
    d = row["short_during"]
    print(f"{name:<34} big: " + ", ".join(f"{b['request']} {b['code']} {b['seconds']:.2f}s" for b in bigs))
    print(f"{'':<34} short text during: n={d.get('n')} p50 {d.get('p50_ms', float('nan')):.0f} ms "
          f"p99 {d.get('p99_ms', float('nan')):.0f} ms max {d.get('max_ms', float('nan')):.0f} ms "
          f"(idle p99 {row['short_idle'].get('p99_ms', float('nan')):.0f} ms)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", nargs=2, metavar=("CLASSES", "SLICE_CHARS"))
    p.add_argument("--texts", type=int, default=256, help="long texts in the big text batch")
    p.add_argument("--quick", action="store_true", help="64 long texts")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "big_requests.json")
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(int(args.serve[0]), int(args.serve[1])))
        return
    from service.app.config import ServingSettings

    texts = 64 if args.quick else args.texts
    default_slice = ServingSettings().embed_slice_chars
    rows = [
        run_case("text, sliced (default)", "text", 77, default_slice, texts),
        run_case("text, one call (before issue 14)", "text", 77, 10**9, texts),
        run_case("top_k=1e9, 3,000 classes", "top_k", 3_000, default_slice, texts),
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs (shared with other sessions)",
        "long_text_chars": len(LONG), "texts": texts, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
