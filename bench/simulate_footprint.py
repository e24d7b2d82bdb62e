"""Wall time and peak memory of a `wardround simulate` run, over its whole process tree.

Ray runs each simulated site's ClientApp in worker processes, so the peak resident
memory of the CLI process alone under-counts. This samples the summed RSS of the
command and all its descendants (RSS and PSS) every 0.5 s.

    python bench/simulate_footprint.py -- wardround simulate --out runs/bench
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def measure(cmd: list[str], *, interval_s: float = 0.5) -> dict:
    """Run ``cmd`` (output discarded); exit code, wall seconds, peak tree PSS/RSS (bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    # PSS shares each shared page (torch, Ray) among the processes
                    # mapping it; summed RSS counts those libraries once per worker.
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval_s)
    return {
        "returncode": proc.returncode,
        "wall_seconds": time.perf_counter() - start,
        "peak_pss_bytes": peak_pss,
        "peak_rss_bytes": peak_rss,
    }


def main(argv: list[str]) -> int:
    """Run the command after ``--`` and print wall seconds and peak tree RSS."""
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else ["wardround", "simulate"]
    figures = measure(cmd)
    print(f"command: {' '.join(cmd)}")
    print(f"exit code: {figures['returncode']}")
    print(f"wall time: {figures['wall_seconds']:.1f} s")
    print(f"peak PSS, whole process tree: {figures['peak_pss_bytes'] / 2**20:.0f} MiB")
    print(
        f"peak summed RSS, whole process tree: {figures['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    return figures["returncode"]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
