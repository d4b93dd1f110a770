"""A (re)started daemon serves the registry's current version and keeps the newest kept ones pinnable."""

from __future__ import annotations

from pathlib import Path

from service.app.config import Settings
from service.app.daemon import Daemon
from service.models.registry import ModelRegistry
from tests.service.grpc_fixtures import model_bytes


def test_startup_loads_the_newest_versions_loaded_from_the_registry(tmp_path: Path) -> None:
    settings = Settings(export={"registry_dir": tmp_path / "models"}, serving={"versions_loaded": 3},
                        backbone={"cache_dir": Path(__file__).resolve().parents[2] / ".eddy" / "cache"})
    daemon = Daemon(settings, role="serve")
    registry = ModelRegistry(tmp_path / "models", keep=10)
    for seed in range(5):
        version = registry.next_version()
        registry.publish(model_bytes(version, seed=seed, backbone_identity=daemon.backbone.identity), {})
    daemon._load_current_model()
    assert daemon.slot.version == 5
    assert daemon.slot.loaded_versions() == [5, 4, 3]
    daemon.close()
