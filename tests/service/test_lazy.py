"""The lazily loaded backbone: a load that cannot succeed is reported once, as nobody's event's fault."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.errors import BackboneUnavailable
from service.models.backbone import BackboneOptions, LazyBackbone


def test_a_backbone_that_cannot_load_fails_fast_after_the_first_try(tmp_path: Path) -> None:
    backbone = LazyBackbone(BackboneOptions(name="no-such-model", dim=384, cache_dir=tmp_path))
    assert backbone.identity == "no-such-model@unavailable"
    with pytest.raises(BackboneUnavailable, match="unknown backbone 'no-such-model'"):
        backbone.embed(["hello"])  # the export child says why
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="unknown backbone"):
        backbone.embed(["again"])  # remembered: no second export attempt per request
    assert time.perf_counter() - start < 0.5
    assert not list(tmp_path.iterdir())  # nothing half-written in the cache


def test_closing_before_the_load_makes_embedding_unavailable(tmp_path: Path) -> None:
    backbone = LazyBackbone(BackboneOptions(name="all-MiniLM-L6-v2", dim=384, cache_dir=tmp_path))
    backbone.close()
    with pytest.raises(BackboneUnavailable, match="shutdown"):
        backbone.embed(["hello"])


def test_a_missing_model_is_unavailable_with_the_install_command(tmp_path: Path) -> None:
    backbone = LazyBackbone(BackboneOptions(name="all-mpnet-base-v2", dim=768, cache_dir=tmp_path,
                                            models_dir=tmp_path))
    assert backbone.identity == "all-mpnet-base-v2@unavailable"
    with pytest.raises(BackboneUnavailable, match="run `eddy models install all-mpnet-base-v2`"):
        backbone.embed(["hello"])


def test_identity_covers_every_encoder_and_the_precision(tmp_path: Path) -> None:
    one = LazyBackbone(BackboneOptions(name="all-MiniLM-L6-v2", dim=384, cache_dir=tmp_path))
    two = LazyBackbone(BackboneOptions(name=("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"), dim=768,
                                       precision="int8", cache_dir=tmp_path))
    assert two.identity == f"{one.identity}-int8+{one.identity}-int8"
