"""``eddy produce``: files become labeled events with stable ids, at a capped rate."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from service.core.events import Event, decode
from service.tools.produce import TokenBucket, produce_file, read_rows
from tests.helpers import consume


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _events(records: list) -> dict[str, Event]:
    out = {}
    for r in records:
        ev = decode(r.value, dim=3, max_bytes=1 << 20)
        assert isinstance(ev, Event), ev
        assert r.key == ev.id.encode()
        out[ev.id] = ev
    return out


@pytest.mark.kafka
def test_csv_rows_become_events_with_ids_from_the_file_name(kafka_bootstrap: str, topic_name: str,
                                                            tmp_path: Path) -> None:
    rows = [{"text": f'row {i}, with "quotes"\nand a newline', "label": f"c{i % 3}", "extra": "x"}
            for i in range(25)]
    path = _write_csv(tmp_path / "calls.csv", rows)
    assert produce_file(path, bootstrap=kafka_bootstrap, topic=topic_name, progress=False) == 25
    events = _events(consume(kafka_bootstrap, topic_name, 25))
    assert sorted(events) == sorted(f"calls-{i}" for i in range(25))
    for i, row in enumerate(rows):
        assert (events[f"calls-{i}"].text, events[f"calls-{i}"].label) == (row["text"], row["label"])


@pytest.mark.kafka
def test_jsonl_with_custom_columns_prefix_and_limit(kafka_bootstrap: str, topic_name: str,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"body": f"text {i}", "intent": i % 2}) for i in range(30)]
    path.write_text("\n".join(lines) + "\n\n")  # a blank line at the end is skipped
    n = produce_file(path, bootstrap=kafka_bootstrap, topic=topic_name, text_col="body", label_col="intent",
                     limit=12, id_prefix="run7", progress=False)
    assert n == 12
    events = _events(consume(kafka_bootstrap, topic_name, 12))
    assert sorted(events) == sorted(f"run7-{i}" for i in range(12))
    assert events["run7-5"].text == "text 5" and events["run7-5"].label == "1"


@pytest.mark.kafka
@pytest.mark.parametrize("base64_features", [False, True])
def test_feature_rows(kafka_bootstrap: str, topic_name: str, tmp_path: Path, base64_features: bool) -> None:
    rows = [{"vec": "[0.5, 1, -2]", "label": "a"}, {"vec": "1 2 3", "label": "b"}]
    path = _write_csv(tmp_path / "f.csv", rows)
    assert produce_file(path, bootstrap=kafka_bootstrap, topic=topic_name, features_col="vec",
                        progress=False, base64_features=base64_features) == 2
    records = consume(kafka_bootstrap, topic_name, 2)
    assert all(isinstance(json.loads(r.value)["features"], str) == base64_features for r in records)
    events = _events(records)
    assert events["f-0"].features.tolist() == [0.5, 1.0, -2.0]
    assert events["f-1"].features.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.kafka
def test_rate_is_not_exceeded(kafka_bootstrap: str, topic_name: str, tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", [{"text": f"t{i}", "label": "a"} for i in range(60)])
    start = time.monotonic()
    assert produce_file(path, bootstrap=kafka_bootstrap, topic=topic_name, rate=100, progress=False) == 60
    elapsed = time.monotonic() - start
    assert elapsed >= 0.5, f"60 events at 100/s took {elapsed:.2f} s"  # ideal 0.55 s (burst 5)


def test_missing_column_names_the_columns_found_before_connecting(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "x.csv", [{"utterance": "hi", "label": "a"}])
    with pytest.raises(ValueError, match=r"x.csv: no column 'text'; columns found: utterance, label"):
        produce_file(path, bootstrap="127.0.0.1:1", topic="t", progress=False)
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "a", "label": "b"}\n{"text": "c"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no field 'label'; fields found: text"):
        list(read_rows(bad, ["label", "text"]))
    with pytest.raises(ValueError, match=r"no such file"):
        produce_file(tmp_path / "absent.csv", bootstrap="127.0.0.1:1", topic="t", progress=False)


def test_token_bucket_holds_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(50.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    for _ in range(501):
        bucket.acquire()
    assert now[0] == pytest.approx(10.0, abs=0.05)  # the first token is free; 500 more take 10 s
    with pytest.raises(ValueError, match="rate must be a positive number"):
        TokenBucket(0)
