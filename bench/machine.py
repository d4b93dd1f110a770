"""What every benchmark JSON records about where it ran: CPUs, load, memory, versions, commit.

The machine is small and shared (2 cores, other jobs running), so the load average at the start
of a run is part of the result: a number measured at load 9 is a lower bound, not a property.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("numpy", "scipy", "scikit-learn", "river", "torch", "onnxruntime", "faiss-cpu", "kafka-python",
            "grpcio", "tokenizers", "avalanche-lib", "psutil")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution name, ``None`` where it is not installed."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """CPU count, load average now, total memory, platform, Python, package versions, git commit."""
    import psutil

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory_total_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "versions": versions(), "git_commit": _git_commit(),
    }
    return info


def limit_blas_threads(n: int = 1) -> None:
    """Use ``n`` BLAS and OpenMP threads in every numeric library, as the daemon does.

    Why: on 2 cores shared with other jobs, a multi-threaded BLAS spins waiting for a core and
    a 2049x2049 eigendecomposition goes from ~1 s to ~13 s.
    """
    from service.app.threads import limit_native_threads

    limit_native_threads(n)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
