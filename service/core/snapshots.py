r"""Snapshots: the whole learner state and the offsets it covers, written atomically.

A snapshot is one file ``snap-<seq>.eddy``::

    b"EDDYSNAP1\\n" + sha256(payload).hexdigest() + b"\\n" + payload

where ``payload`` is an uncompressed ``.npz``: every numpy array of the (nested) state under its
``/``-joined key, and everything else (numbers, strings, lists) as one JSON document under
``__meta__``. Writing goes to a temporary file, is fsynced, renamed into place, and the folder is
fsynced, so a crash leaves either the old set of snapshots or the new one. Reading verifies the
checksum; a corrupt or partial file is skipped in favour of the previous snapshot.

Offsets live inside the snapshot (as Flink does): after a crash the learner restores the state
and seeks to exactly the offsets that state covers, so no event is lost or counted twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from learner.files import atomic_write
from service.errors import CheckpointError

log = logging.getLogger(__name__)

MAGIC = b"EDDYSNAP1\n"
_NAME = re.compile(r"^snap-(\d{12})\.eddy$")
_META_KEY = "__meta__"


def pack(state: dict[str, Any]) -> bytes:
    """Serialise a nested dict of arrays and JSON-able values to checksummed snapshot bytes."""
    arrays: dict[str, np.ndarray] = {}
    meta = _split(state, "", arrays)
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def unpack(data: bytes) -> dict[str, Any]:
    """Inverse of ``pack``. Raises ``CheckpointError`` if the bytes are corrupt or truncated."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 65:
        raise CheckpointError("not an eddy snapshot (bad header)")
    digest = data[len(MAGIC) : len(MAGIC) + 64].decode(errors="replace")
    payload = data[len(MAGIC) + 65 :]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError("snapshot checksum mismatch (corrupt or partially written)")
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
    return _join(meta, arrays)


def _split(value: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError(f"state key {prefix!r}: object arrays cannot be snapshotted")
        arrays[prefix] = value
        return {"__array__": prefix}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{prefix}/{k}" if prefix else str(k), arrays) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def _join(meta: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(meta, dict):
        if set(meta) == {"__array__"}:
            return arrays[meta["__array__"]]
        return {k: _join(v, arrays) for k, v in meta.items()}
    return meta


class SnapshotStore:
    """A folder of numbered snapshots; keeps the newest ``keep``."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep

    def _numbered(self) -> list[tuple[int, Path]]:
        if not self.root.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def write(self, state: dict[str, Any]) -> Path:
        """Write a new snapshot atomically and prune old ones; return its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        numbered = self._numbered()
        seq = numbered[-1][0] + 1 if numbered else 1
        path = self.root / f"snap-{seq:012d}.eddy"
        atomic_write(path, pack(state))
        for _, old in self._numbered()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def candidates(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Valid snapshots, newest first; corrupt ones are logged and skipped."""
        for _, path in reversed(self._numbered()):
            try:
                yield path, unpack(path.read_bytes())
            except (CheckpointError, OSError, ValueError) as exc:
                log.warning("skipping snapshot %s: %s", path.name, exc)

    def set_aside(self) -> Path:
        """Move every snapshot into ``<root>/set-aside-<unix time>/`` (kept, never read again); its path."""
        aside = self.root / f"set-aside-{int(time.time())}"
        aside.mkdir(parents=True, exist_ok=True)
        for _, path in self._numbered():
            path.rename(aside / path.name)
        return aside

    def latest(self) -> dict[str, Any] | None:
        """The newest valid snapshot's state, or None if there is none."""
        for _, state in self.candidates():
            return state
        return None


