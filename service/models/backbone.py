"""A backbone that loads on first use (or in the background at startup).

Loading an encoder means hashing its weights and, the first time on a machine, exporting it to ONNX
(tens of seconds of torch). The export runs in a child process: the daemon never imports torch
(hundreds of MB it would keep for nothing), and a daemon told to stop mid-export kills the child
and exits cleanly instead of finalising the interpreter under a thread deep inside torch.
Feature-only deployments never pay for any of it; text deployments warm it while the rest of
the daemon starts, and the first text event or request waits for it.

``python -m service.models.backbone CACHE_DIR OPTIONS_JSON`` is the child: it exports (and for int8
quantises) and caches the graphs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.errors import BackboneUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneOptions:
    """What to load: ``learner.backbone.load_backbone``'s arguments as plain values.

    ``name`` is one encoder or a tuple of them (concatenated); ``dim`` is their total width.
    """

    name: str | tuple[str, ...]
    dim: int
    runtime: Literal["onnx", "torch"] = "onnx"
    precision: Literal["fp32", "int8"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_tokens: int = 128
    batch_size: int = 64
    threads: int = 0
    cache_dir: Path = Path(".eddy/cache")
    models_dir: Path = Path(".eddy/cache/models")

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``load_backbone`` (all but ``dim``)."""
        out = asdict(self)
        del out["dim"]
        return out


class LazyBackbone:
    """Same protocol as ``learner.backbone.Backbone``; the real one is built once, on demand.

    ``identity`` is known from the start (the weights are hashed, nothing is loaded): the daemon
    checks snapshots and served models against it before any text arrives. ``embed`` raises
    ``BackboneUnavailable`` when the backbone cannot be loaded or ``close`` was called before it
    was: no text is at fault then, so callers must not dead-letter it.
    """

    def __init__(self, options: BackboneOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._backbone: Any = None
        self._closed = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._failure: BackboneUnavailable | None = None  # a failed load is not retried: restart to retry
        self.dim = int(options.dim)
        self.identity = _identity(options)

    def _get(self) -> Any:
        if self._backbone is None and self._lock.locked():
            log.info("text is waiting for the backbone to finish loading")
        with self._lock:
            if self._backbone is None:
                if self._closed.is_set():
                    raise BackboneUnavailable("the backbone was not loaded before shutdown")
                if self._failure is not None:
                    raise self._failure
                o = self.options
                try:
                    if o.runtime == "onnx":
                        self._export_in_child()
                    from learner.backbone import load_backbone

                    self._backbone = load_backbone(**o.load_kwargs())
                except BackboneUnavailable as exc:
                    if not self._closed.is_set():
                        self._failure = exc
                    raise
                except Exception as exc:  # missing package, failed export, unreadable cache...
                    self._failure = BackboneUnavailable(f"backbone {o.name} could not be loaded: {exc}")
                    raise self._failure from exc
                self.identity = self._backbone.identity
            return self._backbone

    def _export_in_child(self) -> None:
        from learner.backbone import onnx_cache_path

        cache_dir = Path(self.options.cache_dir)
        if all(onnx_cache_path(i, cache_dir).exists() for i in self.identity.split("+")):  # hashed at start
            return
        log.info("exporting backbone %s to ONNX in %s (once per machine; tens of seconds)", self.options.name,
                 cache_dir)
        spec = json.dumps(self.options.load_kwargs(), default=str)
        self._child = subprocess.Popen([sys.executable, "-m", "service.models.backbone", str(cache_dir), spec],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if self._closed.is_set():  # close() ran between the check above and Popen
            self._child.terminate()
        output, _ = self._child.communicate()
        code, self._child = self._child.returncode, None
        if self._closed.is_set():
            raise BackboneUnavailable("backbone export stopped: shutting down")
        if code != 0:
            tail = output.decode(errors="replace").strip().splitlines()[-5:]
            raise BackboneUnavailable(f"ONNX export exited with {code}: {' | '.join(tail)}")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with the real backbone, loading it first if needed."""
        return np.asarray(self._get().embed(texts))

    def warm_in_background(self) -> threading.Thread:
        """Start loading now, off the caller's thread."""

        def warm() -> None:
            try:
                self._get()
                log.info("backbone %s ready", self.identity)
            except BackboneUnavailable as exc:
                if not self._closed.is_set():
                    log.error("%s", exc)

        t = threading.Thread(target=warm, name="backbone-warmup", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        """Stop a running export; a backbone not loaded by now never will be (idempotent)."""
        self._closed.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


def _identity(o: BackboneOptions) -> str:
    """The backbone's identity without loading the model (hashing the weights is cheap enough at start)."""
    from learner.backbone import backbone_identity

    try:
        return backbone_identity(o.name, precision=o.precision, models_dir=Path(o.models_dir))
    except (ValueError, OSError):  # not installed: reported when the backbone is first needed
        return f"{o.name if isinstance(o.name, str) else '+'.join(o.name)}@unavailable"


def _main(argv: Sequence[str]) -> int:
    import signal

    from learner.backbone import export_onnx

    # SIGTERM as an exception, so the export's temporary file is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cache_dir, spec = Path(argv[0]), json.loads(argv[1])
    paths = export_onnx(spec["name"], cache_dir, precision=spec["precision"],
                        models_dir=Path(spec["models_dir"]))
    print(" ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
