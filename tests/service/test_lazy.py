"""The lazily loaded backbone: a load that cannot succeed is reported once, as nobody's event's fault."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.errors import BackboneUnavailable
from service.models.backbone import LazyBackbone


def test_a_backbone_that_cannot_load_fails_fast_after_the_first_try(tmp_path: Path) -> None:
    settings = SimpleNamespace(name="no-such-model", runtime="onnx", dim=384, max_tokens=128, batch_size=64,
                               threads=0, cache_dir=str(tmp_path))
    backbone = LazyBackbone(settings)
    assert backbone.identity == "no-such-model@unavailable"
    with pytest.raises(BackboneUnavailable, match="unknown backbone 'no-such-model'"):
        backbone.embed(["hello"])  # the export child says why
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="unknown backbone"):
        backbone.embed(["again"])  # remembered: no second export attempt per request
    assert time.perf_counter() - start < 0.5
    assert not list(tmp_path.iterdir())  # nothing half-written in the cache


def test_closing_before_the_load_makes_embedding_unavailable(tmp_path: Path) -> None:
    settings = SimpleNamespace(name="all-MiniLM-L6-v2", runtime="onnx", dim=384, max_tokens=128, batch_size=64,
                               threads=0, cache_dir=str(tmp_path))
    backbone = LazyBackbone(settings)
    backbone.close()
    with pytest.raises(BackboneUnavailable, match="shutdown"):
        backbone.embed(["hello"])
