"""A backbone that loads on first use (or in the background at startup).

Loading MiniLM means hashing its weights and, the first time on a machine, exporting it to ONNX
(tens of seconds of torch). The export runs in a child process: the daemon never imports torch
(hundreds of MB it would keep for nothing), and a daemon told to stop mid-export kills the child
and exits cleanly instead of finalising the interpreter under a thread deep inside torch.
Feature-only deployments never pay for any of it; text deployments warm it while the rest of
the daemon starts, and the first text event or request waits for it.

``python -m service.models.backbone NAME CACHE_DIR`` is the child: it exports and caches the graph.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import BackboneUnavailable

log = logging.getLogger(__name__)


class LazyBackbone:
    """Same protocol as ``learner.backbone.Backbone``; the real one is built once, on demand.

    ``embed`` raises ``BackboneUnavailable`` when the backbone cannot be loaded or ``close`` was
    called before it was: no text is at fault then, so callers must not dead-letter it.
    """

    def __init__(self, settings: Any) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._backbone: Any = None
        self._closed = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._failure: BackboneUnavailable | None = None  # a failed load is not retried: restart to retry
        self.dim = int(settings.dim)
        self.identity = _identity(settings.name)

    def _get(self) -> Any:
        if self._backbone is None and self._lock.locked():
            log.info("text is waiting for the backbone to finish loading")
        with self._lock:
            if self._backbone is None:
                if self._closed.is_set():
                    raise BackboneUnavailable("the backbone was not loaded before shutdown")
                if self._failure is not None:
                    raise self._failure
                s = self._settings
                try:
                    if s.runtime == "onnx":
                        self._export_in_child(s.name, Path(s.cache_dir))
                    from learner.backbone import load_backbone

                    self._backbone = load_backbone(s.name, runtime=s.runtime, max_tokens=s.max_tokens,
                                                   batch_size=s.batch_size, threads=s.threads,
                                                   cache_dir=Path(s.cache_dir))
                except BackboneUnavailable as exc:
                    if not self._closed.is_set():
                        self._failure = exc
                    raise
                except Exception as exc:  # missing package, failed export, unreadable cache...
                    self._failure = BackboneUnavailable(f"backbone {s.name} could not be loaded: {exc}")
                    raise self._failure from exc
                self.identity = self._backbone.identity
            return self._backbone

    def _export_in_child(self, name: str, cache_dir: Path) -> None:
        from learner.backbone import onnx_cache_path

        if onnx_cache_path(self.identity, cache_dir).exists():  # identity: hashed once, at start
            return
        log.info("exporting backbone %s to ONNX in %s (once per machine; tens of seconds)", name, cache_dir)
        self._child = subprocess.Popen([sys.executable, "-m", "service.models.backbone", name, str(cache_dir)],
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


def _identity(name: str) -> str:
    """The backbone's identity without loading the model (hashing the weights is cheap enough at start)."""
    from learner.backbone import model_dir, model_identity

    try:
        return model_identity(name, model_dir(name))
    except (ValueError, OSError):  # not installed: reported when the backbone is first needed
        return f"{name}@unavailable"


def _main(argv: Sequence[str]) -> int:
    import signal

    from learner.backbone import export_onnx

    # SIGTERM as an exception, so the export's temporary file is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    name, cache_dir = argv
    print(export_onnx(name, Path(cache_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
