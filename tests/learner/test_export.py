"""ONNX export of readouts: the graph computes the Readout formula, carries metadata, is gated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from learner.export import (
    OUTPUT_NAME,
    check_parity,
    load_session,
    readout_to_onnx,
    write_model,
)
from learner.heads.base import Readout

META = {"classes": "[]", "model_version": "3", "backbone_identity": "all-MiniLM-L6-v2@abc",
        "head_kind": "ridge", "created_at": "1700000000.000", "source_offsets": json.dumps({"t-0": 12})}


def make_readout(form: str, k: int, d: int = 16, m: int = 32, seed: int = 0) -> Readout:
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(m, d)).astype(np.float32) / np.sqrt(d) if form == "projection" else None
    p = m if form == "projection" else d
    return Readout(classes=tuple(f"c{i}" for i in range(k)),
                   weight=rng.normal(size=(p, k)).astype(np.float32),
                   bias=rng.normal(size=k).astype(np.float32),
                   temperature=0.7, projection=projection, normalize=form == "normalize")


def run(model_bytes: bytes, X: np.ndarray) -> np.ndarray:
    session, _ = load_session(model_bytes)
    return session.run([OUTPUT_NAME], {"features": X.astype(np.float32)})[0]


@pytest.mark.parametrize("form", ["projection", "normalize", "plain"])
@pytest.mark.parametrize("k", [1, 2, 50])
def test_onnx_equals_readout(form: str, k: int) -> None:
    readout = make_readout(form, k)
    X = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    X[0] = 0.0  # a zero row: normalize must not divide by zero
    got = run(readout_to_onnx(readout, metadata=META).SerializeToString(), X)
    assert got.shape == (40, k) and got.dtype == np.float32
    np.testing.assert_allclose(got, readout.predict_proba(X), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_scores_output_is_raw_scores() -> None:
    readout = make_readout("projection", 5)
    X = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
    session, _ = load_session(readout_to_onnx(readout, metadata={}).SerializeToString())
    (scores,) = session.run(["scores"], {"features": X})
    np.testing.assert_allclose(scores, readout.scores(X), atol=1e-4, rtol=1e-5)


def test_metadata_round_trips_through_file(tmp_path: Path) -> None:
    readout = make_readout("plain", 3)
    meta = dict(META, classes=json.dumps(list(readout.classes)))
    path = tmp_path / "model.onnx"
    write_model(readout_to_onnx(readout, metadata=meta), path)
    session, got = load_session(path)
    assert got == meta
    assert session.get_outputs()[0].name == OUTPUT_NAME
    assert json.loads(got["classes"]) == ["c0", "c1", "c2"]


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    first = readout_to_onnx(make_readout("plain", 2), metadata={"model_version": "1"})
    second = readout_to_onnx(make_readout("plain", 4), metadata={"model_version": "2"})
    write_model(first, path)
    write_model(second, path)  # replaces in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert load_session(path)[1] == {"model_version": "2"}


def test_bad_model_argument_leaves_old_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    write_model(readout_to_onnx(make_readout("plain", 2), metadata={"model_version": "1"}), path)
    with pytest.raises(AttributeError):
        write_model("not a model", path)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert load_session(path)[1] == {"model_version": "1"}


def test_parity_passes_for_own_export() -> None:
    readout = make_readout("normalize", 7)
    session, _ = load_session(readout_to_onnx(readout, metadata={}).SerializeToString())
    probe = np.random.default_rng(3).normal(size=(64, 16))
    result = check_parity(readout, session, probe, tol=1e-5)
    assert result.ok, result.reason
    assert result.max_abs_diff <= 1e-5


def test_parity_catches_different_weights() -> None:
    readout = make_readout("projection", 7)
    other = make_readout("projection", 7, seed=9)
    session, _ = load_session(readout_to_onnx(other, metadata={}).SerializeToString())
    result = check_parity(readout, session, np.random.default_rng(4).normal(size=(32, 16)))
    assert not result.ok and result.max_abs_diff > 1e-4 and "max abs diff" in result.reason


def test_parity_catches_non_finite_and_shape_and_dimension() -> None:
    good = make_readout("plain", 3)
    bad = Readout(good.classes, np.full_like(good.weight, np.nan), good.bias, 1.0)
    probe = np.ones((4, 16))
    session, _ = load_session(readout_to_onnx(bad, metadata={}).SerializeToString())
    assert "NaN" in check_parity(good, session, probe).reason
    wider, _ = load_session(readout_to_onnx(make_readout("plain", 4), metadata={}).SerializeToString())
    assert "shape" in check_parity(good, wider, probe).reason
    session, _ = load_session(readout_to_onnx(good, metadata={}).SerializeToString())
    result = check_parity(good, session, np.ones((4, 15)))  # wrong feature count: reported, not raised
    assert not result.ok and result.reason.startswith("probe failed")


def test_bad_readout_shapes_raise_with_numbers() -> None:
    r = make_readout("plain", 3)
    with pytest.raises(ValueError, match=r"bias has shape \(2,\), expected \(3,\)"):
        readout_to_onnx(Readout(r.classes, r.weight, r.bias[:2], 1.0), metadata={})
    with pytest.raises(ValueError, match="3 columns for 2 classes"):
        readout_to_onnx(Readout(r.classes[:2], r.weight, r.bias, 1.0), metadata={})
    with pytest.raises(ValueError, match="temperature"):
        readout_to_onnx(Readout(r.classes, r.weight, r.bias, 0.0), metadata={})
    with pytest.raises(ValueError, match="projection has shape"):
        readout_to_onnx(Readout(r.classes, r.weight, r.bias, 1.0, projection=np.ones((5, 16))), metadata={})
