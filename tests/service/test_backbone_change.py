"""A snapshot learned with one backbone is never resumed with another: refused (exit 2) or set aside."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import wiring
from service.app.config import load_settings
from service.core.snapshots import SnapshotStore
from service.errors import BackboneChanged
from service.models.backbone import LazyBackbone
from service.models.registry import ModelRegistry
from service.models.served import ModelSlot

REPO = Path(__file__).resolve().parents[2]
OLD = "all-mpnet-base-v2@78c0197b6159"


def parts(tmp_path: Path, **backbone: str) -> wiring.Parts:
    settings = load_settings(checkpoint={"dir": tmp_path / "ckpt"}, backbone=backbone)
    lazy = LazyBackbone(wiring.backbone_options(settings.backbone))
    return wiring.Parts(settings, lazy, ModelRegistry(tmp_path / "models", keep=3), ModelSlot())


def snapshot(tmp_path: Path, identity: str) -> None:
    SnapshotStore(tmp_path / "ckpt").write({"backbone_identity": identity, "counters": {"learned": 7}})


def test_a_snapshot_of_another_backbone_is_refused_with_both_names(tmp_path: Path) -> None:
    snapshot(tmp_path, OLD)
    p = parts(tmp_path)
    with pytest.raises(BackboneChanged) as caught:
        wiring.check_snapshot_backbone(p)
    message = str(caught.value)
    assert OLD in message and p.backbone.identity in message and "ON_BACKBONE_CHANGE=fresh" in message
    assert "\n" not in message
    assert SnapshotStore(tmp_path / "ckpt").latest() is not None  # untouched


def test_fresh_sets_the_old_snapshots_aside(tmp_path: Path) -> None:
    snapshot(tmp_path, OLD)
    p = parts(tmp_path, on_backbone_change="fresh")
    wiring.check_snapshot_backbone(p)
    assert SnapshotStore(tmp_path / "ckpt").latest() is None
    (aside,) = (tmp_path / "ckpt").glob("set-aside-*")
    assert [f.name for f in aside.iterdir()] == ["snap-000000000001.eddy"]


def test_the_same_backbone_resumes(tmp_path: Path) -> None:
    p = parts(tmp_path)
    snapshot(tmp_path, p.backbone.identity)
    wiring.check_snapshot_backbone(p)
    assert SnapshotStore(tmp_path / "ckpt").latest() is not None


def test_the_daemon_exits_2_with_one_line_before_opening_anything(tmp_path: Path) -> None:
    snapshot(tmp_path, OLD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDDY_CHECKPOINT__DIR": str(tmp_path / "ckpt"),
           "EDDY_EXPORT__REGISTRY_DIR": str(tmp_path / "models"), "EDDY_METRICS__PORT": "0",
           "EDDY_SERVING__GRPC_PORT": "0", "EDDY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
           "EDDY_CONFIG": str(tmp_path / "none.toml")}
    done = subprocess.run([sys.executable, "-m", "service.app.cli", "--log-level", "ERROR", "serve"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to mix them" in lines[0] and OLD in lines[0]
