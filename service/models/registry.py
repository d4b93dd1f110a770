"""The model registry: numbered ONNX files and one manifest, written atomically.

Layout under ``root``::

    v00000007.onnx      one file per kept version
    v00000007.onnx.sidecar   what serves beside it (the error compensation), when there is one
    manifest.json       {"format": 1, "last_version": 7, "current": 7,
                         "versions": [{"version": 7, "file": "v00000007.onnx", "meta": {...}}, ...]}
    .lock               advisory lock (fcntl) serialising writers across processes

Contracts:

* versions only increase: ``publish`` assigns ``last_version + 1``, and ``last_version`` is persisted
  even after older files are pruned, so a number is never reused;
* a reader sees either the old or the new manifest, never half of one (tmp file + fsync +
  ``os.replace`` + fsync of the directory); a model file is complete before the manifest names it;
* ``rollback`` never moves ``current`` backwards: it republishes an earlier version's model as a new,
  higher version, so a client never sees the version number decrease;
* at most ``keep`` versions are kept; the current one is never pruned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx

from learner.files import atomic_write
from service.errors import ModelError

MANIFEST = "manifest.json"
_FORMAT = 1


def model_file_name(version: int) -> str:
    """File name of ``version`` inside the registry, e.g. ``v00000007.onnx``."""
    return f"v{version:08d}.onnx"


class ModelRegistry:
    """Numbered, atomically written ONNX models with a manifest naming the current one."""

    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # fcntl locks are per process; this serialises our threads

    # -- reading ---------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The manifest as last replaced (an empty one if nothing was published yet).

        Safe against concurrent writers: the file is only ever replaced whole.
        Raises ``ModelError`` if the file exists but is not a manifest.
        """
        path = self.root / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {"format": _FORMAT, "last_version": 0, "current": None, "versions": []}
        try:
            manifest = json.loads(raw)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("versions"), list):
                raise ValueError("not a manifest object")
        except ValueError as exc:
            raise ModelError(f"{path}: unreadable model manifest ({exc})") from None
        return manifest

    def current(self) -> int | None:
        """The version that should be served, or ``None`` before the first publish."""
        current = self.read_manifest().get("current")
        return int(current) if current is not None else None

    def next_version(self) -> int:
        """The number the next ``publish`` will assign, unless another writer publishes first."""
        return int(self.read_manifest().get("last_version", 0)) + 1

    def versions(self) -> list[dict[str, Any]]:
        """Kept versions, oldest first: ``{"version": int, "file": str, "meta": {str: str}}``."""
        return list(self.read_manifest()["versions"])

    def path(self, version: int) -> Path:
        """The file of a kept ``version``; ``ModelError`` naming the available ones if unknown."""
        return self.root / self._entry(version)["file"]

    def sidecar(self, version: int) -> bytes | None:
        """The sidecar published with ``version`` (the served error compensation), or None."""
        name = self._entry(version).get("sidecar")
        if not name:
            return None
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:  # pruned since the manifest was read
            return None

    def meta(self, version: int) -> dict[str, str]:
        """The metadata published with ``version`` (``ModelError`` if unknown)."""
        return dict(self._entry(version)["meta"])

    def _entry(self, version: int) -> dict[str, Any]:
        """``version``'s manifest entry, from one read of the manifest; ``ModelError`` if not kept."""
        manifest = self.read_manifest()
        for entry in manifest["versions"]:
            if entry["version"] == version:
                return dict(entry)
        available = ", ".join(str(e["version"]) for e in manifest["versions"]) or "none"
        raise ModelError(f"unknown model version {version}; available: {available}")

    # -- writing ---------------------------------------------------------------------------------
    def publish(self, model_bytes: bytes, meta: Mapping[str, str], sidecar: bytes | None = None) -> int:
        """Store ``model_bytes`` (and its ``sidecar``) as the next version, make it current, prune.

        Returns the version. The sidecar is what serves beside the ONNX head (the error
        compensation, ``service.models.served.compensation_bytes``), so every process that follows
        the registry serves exactly what the learner does.

        ``meta`` is stored in the manifest with ``model_version`` set to the assigned number. If the
        ONNX bytes carry a different ``model_version`` in their metadata (another writer published
        in between), the stored file is restamped so file and manifest always agree.
        """
        with self._writer() as manifest:
            version = int(manifest.get("last_version", 0)) + 1
            meta = {**{k: str(v) for k, v in meta.items()}, "model_version": str(version)}
            data = _stamp_version(model_bytes, meta)
            atomic_write(self.root / model_file_name(version), data)
            entry: dict[str, Any] = {"version": version, "file": model_file_name(version), "meta": meta}
            if sidecar is not None:
                entry["sidecar"] = f"{model_file_name(version)}.sidecar"
                atomic_write(self.root / entry["sidecar"], sidecar)
            manifest["versions"].append(entry)
            manifest["last_version"] = version
            manifest["current"] = version
            pruned = self._prune(manifest)
            atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
            for name in pruned:  # only after the manifest stops naming them
                (self.root / name).unlink(missing_ok=True)
            return version

    def rollback(self, version: int | None = None) -> int:
        """Republish ``version`` (default: the kept version before current) as a new version.

        The new entry's meta gains ``rolled_back_from=<version>``. Returns the new version.
        Raises ``ModelError`` if there is nothing to roll back to or ``version`` is not kept.
        """
        manifest = self.read_manifest()
        current = manifest.get("current")
        if version is None:
            older = [e["version"] for e in manifest["versions"] if current is None or e["version"] < current]
            if not older:
                kept = ", ".join(str(e["version"]) for e in manifest["versions"]) or "none"
                raise ModelError(f"no version before {current} to roll back to; available: {kept}")
            version = max(older)
        try:
            data = self.path(version).read_bytes()
        except FileNotFoundError:
            raise ModelError(f"model version {version} was pruned while rolling back") from None
        meta = {**self.meta(version), "rolled_back_from": str(version)}
        return self.publish(data, meta, self.sidecar(version))

    # -- internals -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer(self) -> Iterator[dict[str, Any]]:
        """Hold the thread and process locks, and yield the manifest read under them."""
        with self._lock, open(self.root / ".lock", "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield self.read_manifest()
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _prune(self, manifest: dict[str, Any]) -> list[str]:
        """Drop the oldest entries beyond ``keep`` (never the current); return their file names."""
        entries = manifest["versions"]
        excess = len(entries) - self.keep
        dropped = [e for e in entries if e["version"] != manifest["current"]][: max(excess, 0)]
        manifest["versions"] = [e for e in entries if e not in dropped]
        return [name for e in dropped for name in (e["file"], e.get("sidecar")) if name]


def _stamp_version(model_bytes: bytes, meta: Mapping[str, str]) -> bytes:
    """Return ``model_bytes`` with metadata_props that include ``meta`` (unchanged if they already do).

    Raises ``ModelError`` if the bytes are not an ONNX model.
    """
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as exc:  # onnx raises DecodeError/RuntimeError variants
        raise ModelError(f"not an ONNX model ({type(exc).__name__}: {exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if all(props.get(k) == v for k, v in meta.items()):
        return model_bytes
    props.update(meta)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


