import base64
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.events import REASONS, Event, Rejection, decode, encode, json_schema

DIM = 4
GOOD_FEATURES = [0.1, -0.2, 0.3, 0.4]


def dec(raw: bytes) -> Event | Rejection:
    return decode(raw, dim=DIM, max_bytes=10_000)


def test_text_event_decodes():
    ev = dec(b'{"id": "a1", "label": "sport", "text": "goal!", "ts": 12.5, "meta": {"k": 1}}')
    assert ev == Event("a1", "sport", text="goal!", ts=12.5)


def test_features_event_decodes_to_float32():
    ev = dec(encode("a2", "tech", features=GOOD_FEATURES))
    assert isinstance(ev, Event)
    assert ev.features is not None and ev.features.dtype == np.float32
    np.testing.assert_allclose(ev.features, GOOD_FEATURES, rtol=1e-6)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"x" * 10_001, "too_large"),
        (b"\xff\xfe", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"a string"', "not_object"),
        (b'{"id": "a"}', "missing_field"),
        (b'{"id": "a", "label": "x", "text": "t", "colour": 1}', "unknown_field"),
        (b'{"id": "", "label": "x", "text": "t"}', "bad_id"),
        (b'{"id": 7, "label": "x", "text": "t"}', "bad_id"),
        (b'{"id": "a", "label": "", "text": "t"}', "bad_label"),
        (b'{"id": "a", "label": "   ", "text": "t"}', "bad_label"),
        (json.dumps({"id": "a", "label": "x" * 257, "text": "t"}).encode(), "bad_label"),
        (b'{"id": "a", "label": "x", "text": "t", "features": [1, 2, 3, 4]}', "text_and_features"),
        (b'{"id": "a", "label": "x"}', "no_input"),
        (b'{"id": "a", "label": "x", "features": [1, 2, NaN, 4]}', "non_finite"),
        (b'{"id": "a", "label": "x", "features": [1, 2, Infinity, 4]}', "non_finite"),
        (b'{"id": "a", "label": "x", "features": [1, 2, 1e300, 4]}', "non_finite"),
        (b'{"id": "a", "label": "x", "features": [1, 2, 3]}', "wrong_dimension"),
        (b'{"id": "a", "label": "x", "features": [1, 2, "3", 4]}', "bad_type"),
        (b'{"id": "a", "label": "x", "features": [1, 2, true, 4]}', "bad_type"),
        (b'{"id": "a", "label": "x", "features": "1,2,3,4"}', "bad_type"),
        (b'{"id": "a", "label": "x", "text": 5}', "bad_type"),
        (b'{"id": "a", "label": "x", "text": "t", "ts": "yesterday"}', "bad_type"),
        (b'{"id": "a", "label": "x", "text": "t", "meta": [1]}', "bad_type"),
        (b"[" * 100_000, "not_json"),
    ],
)
def test_bad_events_are_rejections_with_a_reason(raw, reason):
    got = decode(raw, dim=DIM, max_bytes=10_000 if reason == "too_large" else 1_000_000)
    assert isinstance(got, Rejection)
    assert got.reason == reason
    assert got.reason in REASONS
    assert got.detail


def test_wrong_dimension_names_both_numbers():
    got = dec(b'{"id": "a", "label": "x", "features": [1, 2, 3]}')
    assert isinstance(got, Rejection) and "got 3 features, expected 4" in got.detail


def test_tombstone_is_rejected():
    assert isinstance(decode(None, dim=DIM, max_bytes=100), Rejection)


def test_random_bytes_are_rejected_for_a_named_reason():
    # decode's catch-all would turn any crash into "unexpected content"; a foreseen reason must come first
    rng = np.random.default_rng(0)
    for _ in range(2000):
        raw = rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        got = decode(raw, dim=DIM, max_bytes=1000)
        assert isinstance(got, Rejection), got
        assert got.reason in {"not_utf8", "not_json", "not_object", "bad_type", "missing_field"}, got
        assert "unexpected content" not in got.detail, got


def test_schema_mentions_dimension():
    schema = json_schema(384)
    array, b64 = schema["properties"]["features"]["oneOf"]
    assert array["minItems"] == array["maxItems"] == 384
    assert b64["minLength"] == b64["maxLength"] == len(base64.b64encode(bytes(4 * 384)))
    assert schema["additionalProperties"] is False


def test_base64_features_decode_bit_exact():
    x = np.array([0.1, -2.5e-8, 3.0e38, -0.0], dtype=np.float32)
    raw = encode("b1", "tech", features=x, base64_features=True)
    assert json.loads(raw)["features"] == base64.b64encode(x.astype("<f4").tobytes()).decode()
    ev = dec(raw)
    assert isinstance(ev, Event) and ev.features is not None and ev.features.dtype == np.float32
    assert ev.features.tobytes() == x.tobytes()
    ev.features[0] = 1.0  # a private, writable copy of the message's bytes


def _b64_event(payload: bytes | str) -> bytes:
    text = payload if isinstance(payload, str) else base64.b64encode(payload).decode()
    return json.dumps({"id": "b2", "label": "x", "features": text}).encode()


@pytest.mark.parametrize(("payload", "reason", "says"), [
    (np.zeros(DIM + 1, "<f4").tobytes(), "wrong_dimension", "got 5 float32"),
    (np.zeros(DIM, "<f8").tobytes(), "wrong_dimension", "expected 4 (16 bytes)"),
    (b"\x00" * 7, "wrong_dimension", "got 7 bytes"),
    (np.array([0.0, np.nan, 0.0, 0.0], "<f4").tobytes(), "non_finite", "finite"),
    (np.array([0.0, 0.0, np.inf, 0.0], "<f4").tobytes(), "non_finite", "finite"),
    ("AAAA!AAA", "bad_type", "base64"),
    ("AAAAAAAAAAAAAAAAAAAAAA=", "bad_type", "base64"),  # bad padding
    ("", "wrong_dimension", "got 0 float32"),
])
def test_bad_base64_features_are_rejections_that_say_why(payload, reason, says):
    got = dec(_b64_event(payload))
    assert isinstance(got, Rejection)
    assert got.reason == reason and says in got.detail


@pytest.mark.parametrize(
    "features",
    [
        ["1.5", 2, 3, 4],
        [None, 2, 3, 4],
        [[1], [2], [3], [4]],
        [1, 2, 3, {"a": 1}],
        [True, False, True, False],
        [1.5, True, 2.5, 3.5],
    ],
)
def test_non_numbers_in_features_are_bad_type(features):
    raw = json.dumps({"id": "a", "label": "x", "features": features}).encode()
    got = dec(raw)
    assert isinstance(got, Rejection) and got.reason == "bad_type", got


def test_bools_elsewhere_do_not_hide_bools_in_features():
    raw = json.dumps({"id": "a", "label": "x", "features": [1, True, 2, 3], "meta": {"flag": False}}).encode()
    got = dec(raw)
    assert isinstance(got, Rejection) and got.reason == "bad_type"


def test_true_in_text_does_not_reject_good_features():
    raw = json.dumps({"id": "a", "label": "true", "features": GOOD_FEATURES, "meta": {"ok": True}}).encode()
    assert isinstance(dec(raw), Event)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"id": "a", "label": "x", "features": [[1], [1, 2], 3, 4]}', "bad_type"),
        (b'{"id": "a", "label": "\\ud800", "features": [1, 2, 3, 4]}', "bad_label"),
        (b'{"id": "\\udfff", "label": "x", "text": "t"}', "bad_id"),
        (b'{"id": "a", "label": "x", "text": "\\ud800 lone"}', "bad_type"),
    ],
)
def test_ragged_features_and_lone_surrogates_are_rejections(raw, reason):
    got = dec(raw)
    assert isinstance(got, Rejection) and got.reason == reason, got


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "id": json_values | st.text(), "label": json_values | st.text(), "text": json_values,
    "features": json_values | st.lists(st.floats(), min_size=4, max_size=4),
    "ts": json_values, "meta": json_values, "extra": json_values,
}))
def test_any_json_object_decodes_to_an_event_or_a_named_rejection(obj):
    raw = json.dumps(obj).encode()
    got = dec(raw)
    if isinstance(got, Rejection):  # the catch-all fallback is never what explains a JSON value
        assert "unexpected content" not in got.detail, got
    if isinstance(got, Event):
        got.label.encode("utf-8")
        got.id.encode("utf-8")
        assert got.features is None or (got.features.shape == (DIM,) and np.isfinite(got.features).all())
