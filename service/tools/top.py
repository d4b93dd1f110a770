"""``eddy top``: a live terminal view of a running daemon, read from its ``/metrics`` endpoint.

Each refresh fetches the Prometheus text exposition, parses it into a ``Snapshot`` and redraws a
compact view with plain ANSI escapes (no curses). Rates and latency quantiles come from the
difference between two consecutive snapshots, the way Prometheus's ``rate`` and
``histogram_quantile`` would compute them over one refresh interval. ``render`` is pure; only
``fetch_snapshot`` and ``run_top`` touch the network, the clock and the terminal.
"""

from __future__ import annotations

import math
import os
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

LabelSet = tuple[tuple[str, str], ...]

_CLEAR = "\x1b[H\x1b[2J"
FRAME_SEPARATOR = "-" * 72
_BOLD, _RED, _YELLOW, _GREEN, _RESET = "\x1b[1m", "\x1b[31m", "\x1b[33m", "\x1b[32m", "\x1b[0m"


@dataclass(frozen=True)
class Snapshot:
    """Every sample of one scrape: ``samples[(sample_name, sorted label pairs)] = value``.

    ``taken_at`` is the Unix time of the scrape (used for "seconds ago" of timestamp gauges).
    """

    taken_at: float
    samples: Mapping[tuple[str, LabelSet], float]

    def series(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        """Label dicts and values of ``name`` whose labels include ``match``."""
        out = []
        for (sample, labels), value in self.samples.items():
            d = dict(labels)
            if sample == name and all(d.get(k) == v for k, v in match.items()):
                out.append((d, value))
        return out

    def value(self, name: str, **match: str) -> float | None:
        """Sum of the matching series, or None when there is none."""
        values = [v for _, v in self.series(name, **match)]
        return sum(values) if values else None


def parse_metrics(text: str, *, taken_at: float) -> Snapshot:
    """Parse a Prometheus text exposition. Raises ``ValueError`` on malformed input."""
    samples: dict[tuple[str, LabelSet], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Snapshot(taken_at=taken_at, samples=samples)


def fetch_snapshot(url: str, *, timeout: float = 5.0) -> Snapshot:
    """GET ``url`` (a ``/metrics`` endpoint) and parse it. Raises ``OSError`` or ``ValueError``."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8")
    return parse_metrics(text, taken_at=time.time())


# -- arithmetic over two snapshots -------------------------------------------------------------
def counter_delta(now: float, prev: float | None) -> float:
    """Increase of a counter; a decrease means the process restarted, so the new value is the increase."""
    if prev is None:
        return 0.0
    return now - prev if now >= prev else now


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus's estimate of quantile ``q`` from (upper bound, cumulative count) pairs.

    Linear interpolation inside the bucket holding the rank; a rank in the ``+Inf`` bucket returns
    the highest finite bound. None when there are no observations.
    """
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return None
    rank = q * pairs[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in pairs:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return pairs[-1][0]


def _bucket_deltas(now: Snapshot, prev: Snapshot | None, name: str, by: tuple[str, ...]
                   ) -> dict[tuple[str, ...], list[tuple[float, float]]]:
    """Per group of ``by`` labels: (le, increase) pairs of ``<name>_bucket`` between the snapshots."""
    grouped: dict[tuple[str, ...], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in now.series(f"{name}_bucket"):
        before = prev.samples.get((f"{name}_bucket", tuple(sorted(labels.items())))) if prev else None
        key = tuple(labels.get(k, "") for k in by)
        grouped[key][float(labels["le"])] += counter_delta(value, before)
    return {k: sorted(v.items()) for k, v in grouped.items()}


def _rates(now: Snapshot, prev: Snapshot | None, name: str, by: str, dt: float) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, value in now.series(name):
        before = prev.samples.get((name, tuple(sorted(labels.items())))) if prev else None
        out[labels.get(by, "")] += counter_delta(value, before) / dt if dt > 0 else 0.0
    return dict(out)


# -- formatting ---------------------------------------------------------------------------------
def _secs(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "-"


def _age(now: float, stamp: float | None) -> str:
    if stamp is None or stamp <= 0:
        return "never"
    return f"{max(0.0, now - stamp):.0f} s ago"


class _Paint:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text


def render(now: Snapshot, prev: Snapshot | None, dt: float, *, color: bool = False) -> str:
    """The view of ``now`` (rates and quantiles against ``prev``, ``dt`` seconds earlier).

    With ``prev`` None or ``dt`` <= 0 (the first refresh) rates show as ``-``. Pure: the same
    inputs give the same text. ``color`` adds ANSI colors (for terminals).
    """
    paint = _Paint(color)
    first = prev is None or dt <= 0
    lines = [_header(now, paint), _state_line(now, paint), ""]
    lines.append(_events_line(now, prev, dt, first))
    lines.append(_lag_line(now))
    lines.append(_swaps_line(now, prev, first, paint))
    lines.append(_learning_line(now, prev, first))
    lines.extend(_predict_lines(now, prev, dt, first))
    lines.append(_requests_line(now, prev, dt, first, paint))
    return "\n".join(lines)


def _header(now: Snapshot, paint: _Paint) -> str:
    info = now.series("eddy_build_info")
    who = " ".join(f"{k} {v}" for k, v in sorted(info[0][0].items())) if info else ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now.taken_at))
    return paint(f"eddy top  {stamp}  {who}".rstrip(), _BOLD)


def _state_line(now: Snapshot, paint: _Paint) -> str:
    version = now.value("eddy_model_version")
    broker = now.value("eddy_broker_up")
    broker_s = "-" if broker is None else (paint("UP", _GREEN) if broker >= 1 else paint("DOWN", _RED))
    acc = " ".join(f"{d.get('head', '?')} {v:.3f}" for d, v in sorted(
        now.series("eddy_prequential_accuracy"), key=lambda p: p[0].get("head", ""))) or "-"
    return (f"model v{_num(version)}  classes {_num(now.value('eddy_classes'))}  broker {broker_s}  "
            f"accuracy {acc}  memory {_num(now.value('eddy_memory_items'))} items / "
            f"{_bytes(now.value('eddy_memory_bytes'))}  "
            f"snapshot {_age(now.taken_at, now.value('eddy_last_snapshot_timestamp_seconds'))}  "
            f"swap {_age(now.taken_at, now.value('eddy_last_swap_timestamp_seconds'))}")


def _events_line(now: Snapshot, prev: Snapshot | None, dt: float, first: bool) -> str:
    rates = _rates(now, prev, "eddy_events_total", "result", dt)
    parts = [f"{r} {'-' if first else f'{v:,.1f}'}" for r, v in sorted(rates.items())]
    total = now.value("eddy_events_total")
    return f"{'events/s':<12} {'  '.join(parts) or '-'}   (total {_num(total)})"


def _lag_line(now: Snapshot) -> str:
    lag = sorted(now.series("eddy_consumer_lag"), key=lambda p: (len(p[0].get("partition", "")),
                                                                   p[0].get("partition", "")))
    shown = "  ".join(f"p{d.get('partition', '?')} {_num(v)}" for d, v in lag[:8])
    more = f"  (+{len(lag) - 8} partitions)" if len(lag) > 8 else ""
    total = sum(v for _, v in lag) if lag else None
    return f"{'lag':<12} {_num(total)} total   {shown}{more}".rstrip()


def _swaps_line(now: Snapshot, prev: Snapshot | None, first: bool, paint: _Paint) -> str:
    parts = []
    for result in ("applied", "rejected"):
        total = now.value("eddy_swaps_total", result=result) or 0.0
        before = (prev.value("eddy_swaps_total", result=result) or 0.0) if prev else None
        recent = "-" if first else f"+{counter_delta(total, before):.0f}"
        text = f"{result} {recent} (total {_num(total)})"
        if result == "rejected" and not first and counter_delta(total, before) > 0:
            text = paint(text, _YELLOW)
        parts.append(text)
    return f"{'swaps':<12} {'   '.join(parts)}"


def _p99(now: Snapshot, prev: Snapshot | None, name: str) -> float | None:
    deltas = _bucket_deltas(now, prev, name, ())
    return histogram_quantile(0.99, deltas.get((), [])) if deltas else None


def _learning_line(now: Snapshot, prev: Snapshot | None, first: bool) -> str:
    def p99(name: str) -> str:
        return "-" if first else _secs(_p99(now, prev, name))

    return (f"{'p99':<12} learn batch {p99('eddy_learn_batch_seconds')}   "
            f"embed {p99('eddy_embed_seconds')}   label->servable {p99('eddy_label_to_servable_seconds')}")


def _predict_lines(now: Snapshot, prev: Snapshot | None, dt: float, first: bool) -> list[str]:
    groups = _bucket_deltas(now, prev, "eddy_predict_seconds", ("rpc", "input"))
    if not groups:
        return [f"{'predict':<12} -"]
    lines = []
    for i, ((rpc, kind), buckets) in enumerate(sorted(groups.items())):
        count = buckets[-1][1] if buckets else 0.0
        if first:
            stats = "-"
        else:
            stats = (f"{count / dt:,.1f} req/s  p50 {_secs(histogram_quantile(0.5, buckets))}  "
                     f"p99 {_secs(histogram_quantile(0.99, buckets))}")
        lines.append(f"{'predict' if i == 0 else '':<12} {rpc}/{kind:<10} {stats}")
    return lines


def _requests_line(now: Snapshot, prev: Snapshot | None, dt: float, first: bool, paint: _Paint) -> str:
    rates = _rates(now, prev, "eddy_requests_total", "code", dt)
    parts = []
    for code, v in sorted(rates.items()):
        text = f"{code} {'-' if first else f'{v:,.1f}'}"
        parts.append(paint(text, _RED) if code != "OK" and not first and v > 0 else text)
    return f"{'requests/s':<12} {'  '.join(parts) or '-'}"


def run_top(url: str, interval: float, iterations: int | None = None, *, out: TextIO | None = None) -> None:
    """Redraw the view of ``url`` every ``interval`` seconds, ``iterations`` times (None: until Ctrl-C).

    An unreachable or malformed endpoint shows an error line and is retried at the next refresh.
    On a terminal the screen is cleared between frames; otherwise frames are separated by a
    ``FRAME_SEPARATOR`` line (so the output can be piped or logged). Ctrl-C or a closed pipe ends
    the loop quietly.
    """
    out = out or sys.stdout
    tty = out.isatty()
    prev: Snapshot | None = None
    prev_t = 0.0
    done = 0
    try:
        while iterations is None or done < iterations:
            started = time.monotonic()
            try:
                snap = fetch_snapshot(url)
                frame = render(snap, prev, started - prev_t if prev else 0.0, color=tty)
                prev, prev_t = snap, started
            except (OSError, ValueError) as exc:
                frame = f"eddy top: cannot read {url}: {exc} (retrying every {interval:g} s)"
            out.write((_CLEAR + frame + "\n") if tty else (frame + "\n" + FRAME_SEPARATOR + "\n"))
            out.flush()
            done += 1
            if iterations is None or done < iterations:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        out.write("\n")
    except BrokenPipeError:
        # The reader went away (`eddy top | head`): stop quietly, and keep Python's exit-time flush
        # of stdout from raising again.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
