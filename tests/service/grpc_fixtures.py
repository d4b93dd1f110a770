"""Helpers shared by the serving tests: real head models and a real gRPC server in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from learner.export import readout_to_onnx
from learner.heads.base import Readout
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot, ServedModel, load_served_model, make_session
from service.serving.grpc.eddy_v1 import AdminHandler
from service.serving.grpc.server import start_server, stop_server

D = 8
CLASSES = ("billing", "cards", "travel")


def make_readout(classes: tuple[str, ...] = CLASSES, d: int = D, seed: int = 0) -> Readout:
    rng = np.random.default_rng(seed)
    return Readout(
        classes=classes,
        weight=rng.normal(size=(d, len(classes))).astype(np.float32),
        bias=rng.normal(size=len(classes)).astype(np.float32),
        temperature=1.0,
    )


def model_bytes(
    version: int,
    *,
    classes: tuple[str, ...] = CLASSES,
    d: int = D,
    seed: int = 0,
    backbone_identity: str = "test-backbone",
    readout: Readout | None = None,
    extra_meta: dict[str, str] | None = None,
) -> bytes:
    """A head model as the exporter writes it, with every metadata key the contract names."""
    readout = readout or make_readout(classes, d, seed)
    meta = {
        "classes": json.dumps(list(readout.classes)),
        "model_version": str(version),
        "backbone_identity": backbone_identity,
        "head_kind": "ridge",
        "created_at": f"{time.time():.3f}",
        "source_offsets": json.dumps({"eddy.events:0": 10 * version}),
        **(extra_meta or {}),
    }
    return readout_to_onnx(readout, metadata=meta).SerializeToString()


def served(version: int, *, backbone: Any = None, **kwargs: Any) -> ServedModel:
    data = model_bytes(version, **kwargs)
    session = make_session(data)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return ServedModel.from_session(session, version=version, meta=meta, backbone=backbone)


class RegistryAdmin:
    """A tiny real AdminHandler: rollback through the registry, then swap into the slot."""

    def __init__(self, registry: ModelRegistry, slot: ModelSlot, backbone: Any = None) -> None:
        self.registry, self.slot, self.backbone = registry, slot, backbone
        self.forgotten: list[tuple[list[str], str | None]] = []

    async def rollback(self, version: int | None) -> int:
        new = self.registry.rollback(version)
        self.slot.swap(load_served_model(self.registry.path(new), self.backbone, version=new))
        return new

    async def export(self) -> int:
        new = self.registry.publish(
            model_bytes(self.registry.next_version(), seed=99), {"head_kind": "ridge"}
        )
        self.slot.swap(load_served_model(self.registry.path(new), self.backbone, version=new))
        return new

    async def forget(self, ids: list[str], label: str | None) -> dict[str, Any]:
        self.forgotten.append((ids, label))
        return {"forgotten": len(ids), "unknown": 0, "memory_removed": len(ids), "partial": False}


class ServerThread:
    """An asyncio loop in a thread running ``start_server``; tests talk to it with sync clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def running_server(
    slot: ModelSlot,
    *,
    admin: AdminHandler | None = None,
    tls: tuple[Path, Path] | None = None,
    **overrides: Any,
) -> Iterator[tuple[str, Any]]:
    """Yield ``("127.0.0.1:<port>", server)`` for a server on a free port; stop it afterwards."""
    options: dict[str, Any] = dict(
        host="127.0.0.1",
        port=0,
        model_name="eddy",
        max_message_bytes=4 << 20,
        max_batch=64,
        max_text_chars=200,
        admin=admin,
        admin_token=None,
        predict_token=None,
        tls_cert=tls[0] if tls else None,
        tls_key=tls[1] if tls else None,
    )
    options.update(overrides)
    runner = ServerThread()
    try:
        server, port = runner.run(start_server(slot, **options))
        try:
            yield f"127.0.0.1:{port}", server
        finally:
            runner.run(stop_server(server, 1.0))
    finally:
        runner.close()


REPO = Path(__file__).resolve().parents[2]


def real_backbone() -> Any:
    """The real MiniLM backbone (ONNX, cached under .eddy/cache); skips the test if it cannot load."""
    import pytest

    global _BACKBONE
    if _BACKBONE is None:
        try:
            from learner.backbone import load_backbone

            _BACKBONE = load_backbone(threads=1, cache_dir=REPO / ".eddy/cache")
        except Exception as exc:  # a missing package or a failed export: the text path cannot be tested
            pytest.skip(f"backbone unavailable: {exc}")
    return _BACKBONE


_BACKBONE: Any = None


def text_model(version: int, backbone: Any) -> ServedModel:
    """A head over the real backbone's embedding width that separates two topics of text."""
    texts = ["my card was declined", "card payment failed", "book a flight to paris", "hotel for my trip"]
    labels = ["cards", "cards", "travel", "travel"]
    E = backbone.embed(texts).astype(np.float64)
    classes = ("cards", "travel")
    weight = np.stack([E[[i for i, lab in enumerate(labels) if lab == c]].mean(0) for c in classes], axis=1)
    readout = Readout(
        classes=classes,
        weight=(20 * weight).astype(np.float32),
        bias=np.zeros(2, dtype=np.float32),
        temperature=1.0,
    )
    return served(
        version,
        backbone=backbone,
        readout=readout,
        backbone_identity=backbone.identity,
        d=backbone.dim,
        classes=classes,
    )
