"""Benchmarks of simpo-ds (CPU-sized): ``python -m bench.throughput``, ``python -m bench.reducer_memory``.

``bench/make_data.py`` builds the synthetic data and model; both benchmarks write their own section of
``bench/RESULTS.md`` (between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->`` markers) with the
hardware, versions and commit they ran on. Helpers shared by both live here.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
PACKAGES = ("torch", "transformers", "deepspeed", "trl", "datasets", "peft")


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_bytes() -> int:
    """Resident memory of this process now (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Hardware, versions, commit and date for a results table."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(total_mem, 1),
        "python": platform.python_version(),
        **{name: _version(name) for name in PACKAGES},
        "commit": _git("rev-parse", "--short", "HEAD") + (" (+ uncommitted changes)" if dirty else ""),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load_avg": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def environment_markdown(env: dict) -> str:
    versions = ", ".join(f"{name} {env[name]}" for name in PACKAGES)
    return (
        f"- hardware: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB, no GPU\n"
        f"- versions: python {env['python']}, {versions}\n"
        f"- commit `{env['commit']}`, {env['date']}; load average (1/5/15 min) at start: {env['load_avg']}\n"
    )


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``name`` section of RESULTS.md, keeping the other sections."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else "# simpo-ds benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
