"""Choosing the encoder: folders by path, pooling modes, int8, several encoders, missing models, devices.

The reference is always sentence-transformers itself (``encode(..., normalize_embeddings=True)``)
on the same folder. Folders are built from the packaged MiniLM (its weights linked, not copied)
with one file edited. Tests that need all-mpnet-base-v2's weights skip, with the reason, where
``eddy models install all-mpnet-base-v2`` has not been run (CI has no mpnet weights).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from learner.backbone import (
    ModelMissing,
    backbone_dim,
    load_backbone,
    model_dir,
    onnx_cache_path,
)
from learner.onnx_encoder import INT8_MIN_COSINE, PROBE_TEXTS, min_cosine
from learner.st_folder import read_folder

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".eddy" / "cache" / "tests"
MODELS = REPO / ".eddy" / "cache" / "models"
MINILM = "all-MiniLM-L6-v2"
TEXTS = ["I am still waiting on my card?", "What can I do if my card still hasn't arrived after 2 weeks?", "ok",
         "Why was my top-up reverted? " * 40, "Ünïcödé — naïve café, 東京 🙂"]


def st_reference(directory: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    model.max_seq_length = 128
    return np.asarray(model.encode(texts, normalize_embeddings=True, convert_to_numpy=True))


def minilm_copy(root: Path, pooling: dict[str, bool] | None = None) -> Path:
    """A copy of the packaged MiniLM folder (weights linked), optionally with other pooling modes."""
    source = model_dir(MINILM)
    target = root / "my-minilm"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "__pycache__"))
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    if pooling is not None:
        config_path = target / "1_Pooling" / "config.json"
        config = json.loads(config_path.read_text())
        config.update({f"pooling_mode_{k}": v for k, v in pooling.items()})
        config_path.write_text(json.dumps(config))
    return target


def test_a_local_copy_given_as_a_path_embeds_like_the_packaged_name(tmp_path: Path) -> None:
    folder = minilm_copy(tmp_path)
    by_path = load_backbone(str(folder), cache_dir=CACHE)
    by_name = load_backbone(MINILM, cache_dir=CACHE)
    assert by_path.identity.split("@")[0] == "my-minilm"  # the label is the folder's name ...
    assert by_path.identity.split("@")[1] == by_name.identity.split("@")[1]  # ... the hash is the weights'
    assert float(np.abs(by_path.embed(TEXTS) - by_name.embed(TEXTS)).max()) <= 1e-5
    assert backbone_dim(str(folder)) == 384


@pytest.mark.parametrize("modes", [{"cls_token": True, "mean_tokens": False},
                                   {"max_tokens": True, "mean_tokens": False},
                                   {"cls_token": True, "mean_tokens": True}])
def test_pooling_modes_are_read_from_the_folder(tmp_path: Path, modes: dict[str, bool]) -> None:
    folder = minilm_copy(tmp_path, modes)
    expected = read_folder(folder).pooling
    backbone = load_backbone(str(folder), cache_dir=CACHE)
    assert backbone.identity.endswith("-" + "-".join(expected))  # another graph, another cache file
    assert backbone.dim == 384 * len(expected)
    got = backbone.embed(TEXTS)
    np.testing.assert_allclose(got, st_reference(folder, TEXTS), atol=1e-5, rtol=0)


def test_unsupported_modules_are_refused_by_name(tmp_path: Path) -> None:
    folder = minilm_copy(tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="unsupported: \\['Dense'\\]"):
        load_backbone(str(folder), cache_dir=CACHE)


def test_int8_agrees_with_fp32_above_the_floor_and_is_cached_apart() -> None:
    fp32 = load_backbone(MINILM, cache_dir=CACHE)
    int8 = load_backbone(MINILM, cache_dir=CACHE, precision="int8")
    assert int8.identity == fp32.identity + "-int8"
    assert onnx_cache_path(int8.identity, CACHE).exists() and onnx_cache_path(fp32.identity, CACHE).exists()
    probe = list(PROBE_TEXTS)
    assert min_cosine(fp32.embed(probe), int8.embed(probe)) >= INT8_MIN_COSINE  # the documented floor
    a, b = fp32.embed(TEXTS), int8.embed(TEXTS)  # texts it was not checked on: close, not exact
    cosines = (a * b).sum(1)
    assert cosines.min() >= 0.9 and cosines.mean() >= 0.97, cosines
    assert float(np.abs(a - b).max()) > 1e-4  # really quantised, not the fp32 graph again
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


def test_several_encoders_concatenate_unit_norm_blocks() -> None:
    single = load_backbone(MINILM, cache_dir=CACHE)
    both = load_backbone([MINILM, MINILM], cache_dir=CACHE)
    assert both.dim == 768 and both.identity == f"{single.identity}+{single.identity}"
    got = both.embed(TEXTS)
    assert got.shape == (len(TEXTS), 768) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got[:, :384], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got[:, 384:], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got[:, 384:], single.embed(TEXTS), atol=1e-6)
    assert both.embed([]).shape == (0, 768)


def test_a_missing_model_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing) as caught:
        load_backbone("all-mpnet-base-v2", models_dir=tmp_path, cache_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "eddy models install all-mpnet-base-v2" in message
    with pytest.raises(ValueError, match="unknown backbone 'no/such/folder'"):
        load_backbone("no/such/folder")


def test_cuda_without_a_gpu_falls_back_to_cpu_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present: the fallback cannot be observed here")
    with caplog.at_level(logging.WARNING, logger="learner.backbone"):
        backbone = load_backbone(MINILM, cache_dir=CACHE, device="cuda")
    assert backbone.providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
    assert len([r for r in caplog.records if "CUDAExecutionProvider" in r.getMessage()]) == 1
    assert load_backbone(MINILM, cache_dir=CACHE, device="auto").providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]


def test_cuda_embeddings_match_cpu() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no GPU here: onnxruntime has no CUDAExecutionProvider (install eddy[gpu] on a GPU machine)")
    gpu = load_backbone(MINILM, cache_dir=CACHE, device="cuda")
    cpu = load_backbone(MINILM, cache_dir=CACHE, device="cpu")
    assert gpu.providers[0] == "CUDAExecutionProvider"  # type: ignore[attr-defined]
    np.testing.assert_allclose(gpu.embed(TEXTS), cpu.embed(TEXTS), atol=1e-4)


def _mpnet() -> Path:
    try:
        return model_dir("all-mpnet-base-v2", MODELS)
    except ModelMissing as exc:
        pytest.skip(f"needs the mpnet weights: {exc}")


def test_mpnet_embeds_like_sentence_transformers() -> None:
    directory = _mpnet()
    backbone = load_backbone("all-mpnet-base-v2", cache_dir=CACHE, models_dir=MODELS)
    assert backbone.dim == 768 and backbone.identity.startswith("all-mpnet-base-v2@78c0197b6159")
    np.testing.assert_allclose(backbone.embed(TEXTS), st_reference(directory, TEXTS), atol=1e-5, rtol=0)
