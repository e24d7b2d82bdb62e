"""Wall time and peak memory of a `wardround simulate` run, over its whole process tree.

Ray runs each simulated site's ClientApp in worker processes, so the peak resident
memory of the CLI process alone under-counts. This samples the summed RSS of the
command and all its descendants every 0.2 s.

    python bench/simulate_footprint.py -- wardround simulate --out runs/bench
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def main(argv: list[str]) -> int:
    """Run the command after ``--`` and print wall seconds and peak tree RSS."""
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else ["wardround", "simulate"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    wall = time.perf_counter() - start
    print(f"command: {' '.join(cmd)}")
    print(f"exit code: {proc.returncode}")
    print(f"wall time: {wall:.1f} s")
    print(f"peak RSS, whole process tree: {peak / 2**20:.0f} MiB")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
