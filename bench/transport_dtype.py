"""Half-precision transport of plain rounds' deltas: bytes saved, error, learning.

Run from the repository root::

    python bench/transport_dtype.py [--sites 3] [--rounds 5] [--patients 200]
                                    [--write-docs docs/benchmarks.md]

Runs the same simulation (same seed, DP on, SecAgg+ off) once per
``federation.transport-dtype`` (float32, float16, bfloat16), each as its own
``wardround simulate`` process, and reads the run directories:

* **upload**: the median bytes a site sent per train reply (``rounds.jsonl``);
* **error**: the relative L2 error each format gives the round's mean delta of the
  float32 run (consecutive checkpoints of its global adapter: rounds 2..R), encoded
  and decoded with :func:`wardround.common.transport.relative_error`;
* **learning**: the global macro AUROC after each round.

The float32 run is the reference: the error column is measured on its deltas, and
the AUROC columns say what the smaller transport changed in the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wardround.common.config.enums import TransportDtype
from wardround.common.packing import AdapterLayout
from wardround.common.transport import relative_error

SECTION = "bench:transport-dtype"


def _simulate(out: Path, dtype: TransportDtype, args: argparse.Namespace) -> float:
    command = [
        str(Path(sys.executable).with_name("wardround")),
        "simulate",
        "--sites",
        str(args.sites),
        "--rounds",
        str(args.rounds),
        "--patients",
        str(args.patients),
        "--no-secagg",
        "--transport-dtype",
        dtype.value,
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _rounds(run: Path) -> list[dict[str, Any]]:
    lines = (run / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _mean_deltas(run: Path) -> list[np.ndarray]:
    """The float32 run's mean delta of each round after the first, packed."""
    from safetensors.numpy import load_file

    folders = sorted((run / "checkpoints").glob("round-*"))
    states = [load_file(str(f / "adapter.safetensors")) for f in folders]
    layout = AdapterLayout.of_state(states[0])
    return [
        layout.pack(after) - layout.pack(before)
        for before, after in zip(states, states[1:], strict=False)
    ]


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run the three simulations and read their figures."""
    figures: dict[str, Any] = {"runs": {}}
    for dtype in TransportDtype:
        run = root / dtype.value
        seconds = _simulate(run, dtype, args)
        rows = _rounds(run)
        sent = [t["bytes_sent"] for row in rows for t in row.get("train") or []]
        figures["runs"][dtype.value] = {
            "seconds": round(seconds, 1),
            "upload_bytes": int(statistics.median(sent)) if sent else None,
            "auroc": [row.get("global_auroc") for row in rows],
        }
    deltas = _mean_deltas(root / TransportDtype.FLOAT32.value)
    for dtype in TransportDtype:
        errors = [relative_error(d, dtype) for d in deltas]
        figures["runs"][dtype.value]["error_median"] = statistics.median(errors)
        figures["runs"][dtype.value]["error_max"] = max(errors)
    figures["delta_values"] = int(deltas[0].size) if deltas else 0
    return figures


def docs_section(figures: dict[str, Any], command: str) -> str:
    """The Markdown section: command, table, what it shows."""
    from wardround.simulations.reporting import describe_machine, machine_info

    reference = figures["runs"][TransportDtype.FLOAT32.value]
    lines = [
        "## Half-precision transport of plain rounds' deltas (`bench/transport_dtype.py`)",
        "",
        "Written by the command below; do not edit by hand.",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Machine: {describe_machine(machine_info())}. The same simulation (seed, "
        "data, DP on, SecAgg+ off) once per `federation.transport-dtype`. *Error*: "
        "the relative L2 error each format gives the float32 run's mean delta of "
        f"rounds 2..R ({figures['delta_values']:,} values each). *AUROC*: the global "
        "macro AUROC before training, then after each round.",
        "",
        "| transport | upload per site per round | × float32 | error (median) | "
        "error (max) | AUROC by round | wall |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, run in figures["runs"].items():
        ratio = (
            run["upload_bytes"] / reference["upload_bytes"]
            if run["upload_bytes"] and reference["upload_bytes"]
            else float("nan")
        )
        auroc = ", ".join("—" if a is None else f"{a:.3f}" for a in run["auroc"])
        lines.append(
            f"| {name} | {run['upload_bytes']:,} B | {ratio:.2f} | "
            f"{run['error_median']:.1e} | {run['error_max']:.1e} | {auroc} | "
            f"{run['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table; optionally write it to the docs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=200, help="per site")
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wr-transport-") as scratch:
        figures = measure(args, Path(scratch))
    command = "python bench/transport_dtype.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    section = docs_section(figures, command.strip())
    print(section)
    if args.write_docs:
        from wardround.simulations.reporting import write_marked_section

        write_marked_section(args.write_docs, SECTION, section)
    return figures


if __name__ == "__main__":
    main()
