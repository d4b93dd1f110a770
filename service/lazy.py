"""A backbone that loads on first use (or in the background at startup).

Loading MiniLM means hashing its weights and, the first time on a machine, exporting it to ONNX
(tens of seconds). Feature-only deployments never pay for it; text deployments warm it while the
rest of the daemon starts, and the first text event or request waits for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class LazyBackbone:
    """Same protocol as ``learner.backbone.Backbone``; the real one is built once, on demand."""

    def __init__(self, settings: Any) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._backbone: Any = None
        self.dim = int(settings.dim)
        self.identity = _identity(settings.name)

    def _get(self) -> Any:
        with self._lock:
            if self._backbone is None:
                from learner.backbone import load_backbone

                s = self._settings
                self._backbone = load_backbone(s.name, runtime=s.runtime, max_tokens=s.max_tokens,
                                               batch_size=s.batch_size, threads=s.threads,
                                               cache_dir=Path(s.cache_dir))
                self.identity = self._backbone.identity
            return self._backbone

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with the real backbone, loading it first if needed."""
        return np.asarray(self._get().embed(texts))

    def warm_in_background(self) -> threading.Thread:
        """Start loading now, off the caller's thread."""

        def warm() -> None:
            try:
                self._get()
                log.info("backbone %s ready", self.identity)
            except Exception as exc:
                log.error("backbone failed to load: %s", exc)

        t = threading.Thread(target=warm, name="backbone-warmup", daemon=True)
        t.start()
        return t


def _identity(name: str) -> str:
    """The backbone's identity without loading the model (hashing the weights is cheap enough at start)."""
    from learner.backbone import model_dir, model_identity

    try:
        return model_identity(name, model_dir(name))
    except (ValueError, OSError):  # not installed: reported when the backbone is first needed
        return f"{name}@unavailable"
