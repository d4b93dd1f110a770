"""The model registry: numbered atomic files, a manifest, pruning, and rollback that only moves forward."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import onnx
import pytest

from service.errors import ModelError
from service.models.registry import MANIFEST, ModelRegistry, model_file_name
from service.models.served import load_served_model
from tests.service.grpc_fixtures import model_bytes


def _publish(registry: ModelRegistry, seed: int = 0) -> int:
    return registry.publish(
        model_bytes(registry.next_version(), seed=seed), {"head_kind": "ridge", "seed": str(seed)}
    )


def test_empty_registry_has_no_current(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=3)
    assert registry.current() is None
    assert registry.versions() == []
    assert registry.next_version() == 1


def test_publish_assigns_increasing_versions_and_writes_files(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=5)
    assert [_publish(registry) for _ in range(3)] == [1, 2, 3]
    assert registry.current() == 3
    assert registry.path(2) == tmp_path / model_file_name(2)
    assert registry.path(2).read_bytes()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["current"] == 3 and manifest["last_version"] == 3
    assert registry.versions()[0]["meta"]["head_kind"] == "ridge"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_versions_persist_across_instances(tmp_path: Path) -> None:
    _publish(ModelRegistry(tmp_path, keep=2))
    _publish(ModelRegistry(tmp_path, keep=2))
    assert ModelRegistry(tmp_path, keep=2).current() == 2


def test_keep_prunes_oldest_but_numbers_are_never_reused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=2)
    for _ in range(5):
        _publish(registry)
    assert [v["version"] for v in registry.versions()] == [4, 5]
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == [model_file_name(4), model_file_name(5)]
    with pytest.raises(ModelError, match="unknown model version 2; available: 4, 5"):
        registry.path(2)
    assert _publish(registry) == 6


def test_rollback_republishes_earlier_model_as_new_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=5)
    _publish(registry, seed=1)
    _publish(registry, seed=2)
    new = registry.rollback()
    assert new == 3 and registry.current() == 3
    assert registry.meta(3)["rolled_back_from"] == "1"
    assert registry.meta(3)["seed"] == "1"
    # The file is self-describing: its ONNX metadata names the new version and the origin.
    props = {p.key: p.value for p in onnx.load(registry.path(3)).metadata_props}
    assert props["model_version"] == "3" and props["rolled_back_from"] == "1"
    assert load_served_model(registry.path(3), None).version == 3


def test_rollback_to_named_version_and_errors(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=5)
    with pytest.raises(ModelError, match="no version before None"):
        registry.rollback()
    _publish(registry)
    with pytest.raises(ModelError, match="no version before 1 to roll back to; available: 1"):
        registry.rollback()
    _publish(registry)
    _publish(registry)
    assert registry.rollback(2) == 4
    with pytest.raises(ModelError, match="unknown model version 9; available: 1, 2, 3, 4"):
        registry.rollback(9)


def test_publish_restamps_a_stale_version_in_the_bytes(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=5)
    _publish(registry)
    # Another writer published between next_version() and publish(): the bytes say 1, the registry assigns 2.
    version = registry.publish(model_bytes(1), {"head_kind": "ridge"})
    assert version == 2
    assert load_served_model(registry.path(2), None).version == 2


def test_publish_rejects_bytes_that_are_not_onnx(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=5)
    with pytest.raises(ModelError, match="not an ONNX model"):
        registry.publish(b"\xff\x00garbage", {})
    assert registry.current() is None


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    data = model_bytes(1)
    results: list[int] = []

    def publish_some() -> None:
        registry = ModelRegistry(tmp_path, keep=50)  # separate instances: the file lock must serialise them
        for _ in range(5):
            results.append(registry.publish(data, {}))

    threads = [threading.Thread(target=publish_some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 21))
    assert ModelRegistry(tmp_path, keep=50).current() == 20


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_a_lost_manifest_is_rebuilt_from_the_files_and_versions_never_go_back(tmp_path: Path, damage: str) -> None:
    registry = ModelRegistry(tmp_path, keep=3)
    for _ in range(5):
        _publish(registry)
    if damage == "deleted":
        (tmp_path / MANIFEST).unlink()
    else:
        (tmp_path / MANIFEST).write_bytes(b'{"format": 1, "versi')
    (tmp_path / model_file_name(3)).write_bytes(b"bit rot")  # a damaged file is skipped, not served
    recovered = ModelRegistry(tmp_path, keep=3)
    assert recovered.current() == 5
    assert [v["version"] for v in recovered.versions()] == [4, 5]
    assert json.loads((tmp_path / MANIFEST).read_text())["current"] == 5  # written back
    assert _publish(recovered) == 6


def test_numbering_stays_above_a_version_seen_elsewhere(tmp_path: Path) -> None:
    """All files gone, but the newest snapshot says v13 was served: the next model is v14, never v1."""
    registry = ModelRegistry(tmp_path, keep=3)
    registry.observe(13)
    assert registry.next_version() == 14
    assert _publish(registry) == 14


def test_a_version_seen_once_is_not_reused_after_the_manifest_is_lost_meanwhile(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=2)
    for _ in range(3):
        _publish(registry)
    for path in tmp_path.glob("v*.onnx"):
        path.unlink()
    (tmp_path / MANIFEST).unlink()
    assert _publish(registry) == 4  # this process saw 3


def test_erase_before_purges_versions_that_know_forgotten_data_and_rollback_says_why(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path, keep=5)
    for _ in range(3):
        _publish(registry)
    assert registry.erase_before(3) == [1, 2]
    assert [v["version"] for v in registry.versions()] == [3]
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == [model_file_name(3)]
    with pytest.raises(ModelError, match="versions before 3 were erased by a forget"):
        registry.rollback()
    with pytest.raises(ModelError, match="model version 1 was erased"):
        registry.rollback(1)
    (tmp_path / MANIFEST).unlink()  # a rebuilt manifest cannot find them again either
    assert ModelRegistry(tmp_path, keep=5).current() == 3
