"""Run every benchmark in turn, then write bench/results/summary.json and BENCHMARKS.md's results.

    .venv/bin/python bench/run_all.py [--quick] [--only accuracy throughput ...] [--report-only]

``make bench`` runs the full suite (about an hour on the shared 2-core machine: River's
pure-Python learners dominate); ``make bench-quick`` the ``--quick`` one (under 10 minutes: fewer
events, one seed, banking77 only, one River learner; the component benchmarks heads, memory,
backbone, heads_banking77 and grpc_latency are skipped). Each module is its own process with its
output streamed through; a failing or timed-out module is recorded in the summary and the run goes
on. Modules too slow for ``--quick`` keep their last full results, which the report still shows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine_info  # noqa: E402
from bench.report import write_report  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Module:
    """One benchmark script: its arguments for a full and a quick run (``None``: skipped in quick)."""

    name: str
    full: tuple[str, ...]
    quick: tuple[str, ...] | None
    quick_timeout_s: int = 240


# Order matters: throughput reads accuracy.json (River's tuned values and fastest accurate learner).
MODULES = (
    Module("heads", (), None),
    Module("memory", (), None),
    Module("export", (), (), 60),
    Module("backbone", (), None),
    Module("footprint", (), (), 90),
    Module("heads_banking77", (), None),
    Module("grpc_latency", (), None),
    Module("accuracy", (), ("--quick",), 300),
    Module("throughput", (), ("--quick",), 300),
    Module("serving", (), ("--quick",), 300),
    Module("ood", (), ("--quick",), 300),
)


def run_module(module: Module, quick: bool) -> dict[str, Any]:
    """Run one module as a child process; its rc, seconds and command (rc 124: timed out)."""
    args = module.quick if quick else module.full
    if args is None:
        return {"status": "skipped in --quick (keeps its last full result)", "rc": None, "seconds": 0.0}
    cmd = [sys.executable, str(REPO / "bench" / f"{module.name}.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    timeout = module.quick_timeout_s if quick else 3 * 3600
    print(f"\n===== {module.name}: {' '.join(cmd[1:])} (limit {timeout} s)", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    seconds = time.perf_counter() - t0
    status = "ok" if rc == 0 else ("timed out" if rc == 124 else f"failed (exit {rc})")
    print(f"===== {module.name}: {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "rc": rc, "seconds": seconds, "command": " ".join(cmd[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the under-10-minute suite")
    parser.add_argument("--only", nargs="*", help="module names to run (default: all)")
    parser.add_argument("--report-only", action="store_true", help="only regenerate summary.json and the report")
    args = parser.parse_args(argv)
    machine = machine_info()
    print(f"machine: {machine['cpu_count']} CPUs, load average {machine['load_average_at_start']}", flush=True)
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    if not args.report_only:
        for module in MODULES:
            if args.only and module.name not in args.only:
                continue
            runs[module.name] = run_module(module, args.quick)
    extra = {"run_all": {"quick": args.quick, "modules": runs, "seconds": time.perf_counter() - started,
                         "machine": machine}}
    summary = write_report(RESULTS, REPO / "BENCHMARKS.md", extra, readme=REPO / "README.md")
    print(f"\nsummary ({'quick' if args.quick else 'full'} run, {time.perf_counter() - started:.0f} s):")
    for key, value in summary.items():
        if key not in ("definitions", "machine", "run_all"):
            print(f"  {key:<50} {value}")
    print(f"wrote {RESULTS / 'summary.json'} and BENCHMARKS.md")
    failed = [name for name, r in runs.items() if r["rc"] not in (0, None)]
    if failed:
        print(f"modules that did not finish: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
