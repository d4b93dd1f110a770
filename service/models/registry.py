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
* at most ``keep`` versions are kept; the current one is never pruned;
* a missing or corrupt manifest is rebuilt from the version files themselves (each carries its
  ``model_version`` in its ONNX metadata): the newest valid file becomes current, and numbering goes
  on above the highest version this process has seen (files, the old manifest, or a number given to
  ``observe``, such as the newest snapshot's ``model_version``), never at or below it;
* ``erase_before`` (after a forget) deletes every older version: they still know the forgotten
  events, so they are purged rather than kept and refused, because a kept file is still a copy of
  the data and a lost manifest would let it be found again. ``rollback`` to an erased version is
  refused with that reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx

from learner.files import atomic_write
from service.errors import ModelError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = 1
_FILE = re.compile(r"^v(\d{8})\.onnx$")


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
        self._seen = 0  # the highest version number seen; none at or below it is published again
        self._scan_cache: tuple[tuple[tuple[str, int, int], ...], dict[str, Any]] | None = None
        self._recover()

    # -- reading ---------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The manifest as last replaced (an empty one if nothing was published yet).

        Safe against concurrent writers: the file is only ever replaced whole. A missing or
        corrupt manifest is rebuilt from the version files (module docstring).
        """
        manifest = self._manifest_file()
        if manifest is None:
            manifest = self._scanned()
        seen = [int(manifest.get("last_version") or 0), *(int(e["version"]) for e in manifest["versions"])]
        self._seen = max(self._seen, *seen)
        return manifest

    def _manifest_file(self) -> dict[str, Any] | None:
        """The manifest file's contents, or None when it is missing or unreadable (logged)."""
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_bytes())
            if not isinstance(manifest, dict) or not isinstance(manifest.get("versions"), list):
                raise ValueError("not a manifest object")
            return manifest
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.error("%s: unreadable model manifest (%s); rebuilt from the version files", path, exc)
            return None

    def observe(self, version: int) -> None:
        """Remember that ``version`` was served or recorded elsewhere (a snapshot): numbering stays above it."""
        self._seen = max(self._seen, int(version))

    def _scanned(self) -> dict[str, Any]:
        """A manifest rebuilt from the valid version files on disk (cached while the folder is unchanged)."""
        files = []
        for p in self.root.iterdir():
            if _FILE.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    files.append((p.name, st.st_mtime_ns, st.st_size))
        key = tuple(sorted(files))
        if self._scan_cache is not None and self._scan_cache[0] == key:
            return json.loads(json.dumps(self._scan_cache[1]))
        entries = [e for name, _, _ in key if (e := self._scan_entry(name)) is not None]
        numbers = [int(m.group(1)) for name, _, _ in key if (m := _FILE.match(name))]
        manifest = {"format": _FORMAT, "last_version": max([self._seen, *numbers]),
                    "current": entries[-1]["version"] if entries else None, "versions": entries}
        self._scan_cache = (key, manifest)
        return json.loads(json.dumps(manifest))

    def _scan_entry(self, name: str) -> dict[str, Any] | None:
        """The manifest entry of version file ``name``, or None if it is not a valid ONNX model of that version."""
        version = int(name[1:9])
        try:
            model = onnx.load_model(str(self.root / name), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError/RuntimeError variants
            log.warning("registry scan: %s is not a valid model (%s); skipped", name, exc)
            return None
        meta = {p.key: p.value for p in model.metadata_props}
        if meta.get("model_version") != str(version):
            log.warning("registry scan: %s says model_version %r; skipped", name, meta.get("model_version"))
            return None
        entry: dict[str, Any] = {"version": version, "file": name, "meta": meta}
        if (self.root / f"{name}.sidecar").exists():
            entry["sidecar"] = f"{name}.sidecar"
        return entry

    def _recover(self) -> None:
        """Rewrite a missing or corrupt manifest from the version files, when there are any.

        Under the writer lock, so a publisher that has written its file but not yet its manifest is
        not overtaken. A registry that cannot be written is still served from the scan.
        """
        if not any(_FILE.match(p.name) for p in self.root.iterdir()) or self._manifest_file() is not None:
            return
        try:
            with self._writer() as manifest:
                if self._manifest_file() is not None or not manifest["versions"]:
                    return
                atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as exc:
            log.warning("could not write the rebuilt manifest of %s: %s", self.root, exc)
            return
        log.warning("model registry %s had no readable manifest: rebuilt from %d version files, serving v%s",
                    self.root, len(manifest["versions"]), manifest["current"])

    def current(self) -> int | None:
        """The version that should be served, or ``None`` before the first publish."""
        current = self.read_manifest().get("current")
        return int(current) if current is not None else None

    def next_version(self) -> int:
        """The number the next ``publish`` will assign, unless another writer publishes first."""
        return max(int(self.read_manifest().get("last_version", 0)), self._seen) + 1

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
            version = max(int(manifest.get("last_version", 0)), self._seen) + 1
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
            self._seen = max(self._seen, version)
            return version

    def erase_before(self, version: int) -> list[int]:
        """Delete every kept version older than ``version`` (they know forgotten events); return them.

        The manifest records ``erased_before`` so a rollback to them is refused with the reason.
        """
        with self._writer() as manifest:
            dropped = [e for e in manifest["versions"] if e["version"] < version]
            if not dropped and int(manifest.get("erased_before") or 0) >= version:
                return []
            manifest["versions"] = [e for e in manifest["versions"] if e["version"] >= version]
            manifest["erased_before"] = max(int(manifest.get("erased_before") or 0), version)
            atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
            for e in dropped:
                for name in (e["file"], e.get("sidecar")):
                    if name:
                        (self.root / name).unlink(missing_ok=True)
            return [int(e["version"]) for e in dropped]

    def rollback(self, version: int | None = None) -> int:
        """Republish ``version`` (default: the kept version before current) as a new version.

        The new entry's meta gains ``rolled_back_from=<version>``. Returns the new version.
        Raises ``ModelError`` if there is nothing to roll back to or ``version`` is not kept.
        """
        manifest = self.read_manifest()
        current = manifest.get("current")
        erased = int(manifest.get("erased_before") or 0)
        if version is not None and version < erased:
            raise ModelError(f"model version {version} was erased: versions before {erased} still knew "
                             f"forgotten events (a forget was applied)")
        if version is None:
            older = [e["version"] for e in manifest["versions"] if current is None or e["version"] < current]
            if not older:
                kept = ", ".join(str(e["version"]) for e in manifest["versions"]) or "none"
                why = f" (versions before {erased} were erased by a forget)" if erased else ""
                raise ModelError(f"no version before {current} to roll back to{why}; available: {kept}")
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


