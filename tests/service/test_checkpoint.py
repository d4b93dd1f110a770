import numpy as np
import pytest

from service.core.snapshots import SnapshotStore, pack, unpack
from service.errors import CheckpointError


def state(i: int) -> dict:
    return {"head": {"G": np.full((3, 3), float(i)), "classes": ["a", "b"], "lam": 0.5},
            "offsets": {"t:0": i}, "nested": {"none": None, "ints": np.arange(i + 1)}}


def test_pack_round_trips_arrays_and_values():
    got = unpack(pack(state(2)))
    np.testing.assert_array_equal(got["head"]["G"], np.full((3, 3), 2.0))
    assert got["head"]["classes"] == ["a", "b"]
    assert got["offsets"] == {"t:0": 2}
    assert got["nested"]["none"] is None
    np.testing.assert_array_equal(got["nested"]["ints"], np.arange(3))


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_truncated_snapshot_is_detected(cut):
    data = pack(state(1))
    with pytest.raises(CheckpointError):
        unpack(data[:-cut])


def test_flipped_byte_is_detected():
    data = bytearray(pack(state(1)))
    data[-20] ^= 0xFF
    with pytest.raises(CheckpointError, match="checksum"):
        unpack(bytes(data))


def test_store_keeps_newest_and_falls_back_past_corruption(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    for i in range(4):
        store.write(state(i))
    assert len(list(tmp_path.glob("snap-*.eddy"))) == 2
    assert store.latest()["offsets"] == {"t:0": 3}
    newest = sorted(tmp_path.glob("snap-*.eddy"))[-1]
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    assert store.latest()["offsets"] == {"t:0": 2}


def test_no_temp_files_left(tmp_path):
    SnapshotStore(tmp_path).write(state(0))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_empty_store_has_no_latest(tmp_path):
    assert SnapshotStore(tmp_path / "missing").latest() is None
