"""What benchmark and study reports share: the machine, and sections of docs.

The sections of ``docs/benchmarks.md`` that commands write: a command owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
and rewrites it on every run; everything outside its markers (hand-written
sections, other commands' sections) stays as it is.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """This machine, for a report: CPUs, CPU model, memory, GPU, load average."""
    import psutil

    gpu = "none"
    torch = sys.modules.get("torch")  # asked only where torch is already loaded
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": round(os.getloadavg()[0], 2),
    }


def describe_machine(machine: dict[str, Any]) -> str:
    """One line: '2 CPUs (Intel Xeon ...), 23.4 GiB, no GPU, Linux 6.1'."""
    gpu = "no GPU" if machine.get("gpu") in (None, "none") else machine["gpu"]
    return (
        f"{machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB memory, {gpu}, {machine['os']}"
    )


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_marked_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` replaced by ``body`` (appended if absent)."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_marked_section(path: Path, name: str, body: str) -> None:
    """Rewrite section ``name`` of the Markdown file at ``path`` (atomically)."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(replace_marked_section(text, name, body))
    os.replace(tmp, path)
