"""The frozen backbone: sentence-transformers' embeddings, cached ONNX export, order kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from learner.backbone import Backbone, load_backbone, model_dir, onnx_cache_path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".eddy" / "cache" / "tests"  # git-ignored; shared by test runs so export happens once
NAME = "all-MiniLM-L6-v2"
TEXTS = [
    "I am still waiting on my card?",
    "What can I do if my card still hasn't arrived after 2 weeks?",
    "",
    "ok",
    "Ünïcödé — naïve café, 東京 and emoji 🙂",
    "Why was my top-up reverted? " * 40,  # far past max_tokens: truncated like sentence-transformers
    "How do I change my PIN",
    "  spaces   everywhere  ",
]


@pytest.fixture(scope="session")
def onnx_backbone() -> Backbone:
    return load_backbone(NAME, runtime="onnx", cache_dir=CACHE, batch_size=3)


@pytest.fixture(scope="session")
def torch_backbone() -> Backbone:
    return load_backbone(NAME, runtime="torch", batch_size=3)


@pytest.fixture(scope="session")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir(NAME)), device="cpu")
    model.max_seq_length = 128
    return model.encode(TEXTS, batch_size=4, convert_to_numpy=True)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_embeddings_equal_sentence_transformers(runtime: str, request: pytest.FixtureRequest,
                                                reference: np.ndarray) -> None:
    backbone: Backbone = request.getfixturevalue(f"{runtime}_backbone")
    got = backbone.embed(TEXTS)
    assert got.shape == (len(TEXTS), backbone.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_order_preserved_across_batches_and_lengths(onnx_backbone: Backbone) -> None:
    whole = onnx_backbone.embed(TEXTS)
    one_by_one = np.vstack([onnx_backbone.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(whole, one_by_one, atol=1e-5)
    reversed_ = onnx_backbone.embed(TEXTS[::-1])
    np.testing.assert_allclose(reversed_[::-1], whole, atol=1e-5)


def test_empty_input_gives_zero_rows(onnx_backbone: Backbone, torch_backbone: Backbone) -> None:
    for backbone in (onnx_backbone, torch_backbone):
        out = backbone.embed([])
        assert out.shape == (0, backbone.dim) and out.dtype == np.float32


def test_identity_names_model_and_weights(onnx_backbone: Backbone, torch_backbone: Backbone) -> None:
    assert onnx_backbone.identity == torch_backbone.identity
    name, digest = onnx_backbone.identity.split("@")
    assert name == NAME and len(digest) == 12


def test_second_load_reuses_cached_export(onnx_backbone: Backbone) -> None:
    path = onnx_cache_path(onnx_backbone.identity, CACHE)
    before = path.stat().st_mtime_ns
    again = load_backbone(NAME, cache_dir=CACHE)
    assert path.stat().st_mtime_ns == before
    assert [p.name for p in CACHE.iterdir() if p.name.endswith(".tmp")] == []
    np.testing.assert_allclose(again.embed(TEXTS[:2]), onnx_backbone.embed(TEXTS[:2]), atol=1e-6)


def test_unknown_name_and_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'bert-huge'"):
        load_backbone("bert-huge")
    with pytest.raises(ValueError, match="max_tokens must be in"):
        load_backbone(NAME, max_tokens=1000)
    with pytest.raises(ValueError, match="runtime/precision/device must be"):
        load_backbone(NAME, runtime="tpu", cache_dir=CACHE)  # type: ignore[arg-type]


def test_single_string_is_rejected(onnx_backbone: Backbone) -> None:
    with pytest.raises(TypeError):
        onnx_backbone.embed("one string, not a list")


@pytest.mark.slow
def test_fresh_export_writes_one_file(tmp_path: Path, reference: np.ndarray) -> None:
    backbone = load_backbone(NAME, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [onnx_cache_path(backbone.identity, tmp_path / "cache")]
    np.testing.assert_allclose(backbone.embed(TEXTS), reference, atol=1e-5, rtol=0)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
