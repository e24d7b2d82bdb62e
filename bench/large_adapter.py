"""A large adapter through a deployed round: time beyond training, memory, bytes.

Run from the repository root::

    python bench/large_adapter.py [--rank 200] [--small-rank 8] [--rounds 2]
                                  [--transports secagg,plain] [--json OUT]
                                  [--write-docs docs/benchmarks.md]

The base is ViT-Large/16 (64-pixel images) and BERT-Large, built from their standard
configs with random weights and saved once; ``model.trainable = "all"`` puts LoRA of
rank ``--rank`` on both encoders' attention projections, which at rank 200 is an
adapter of about 40 M parameters (160 MB in float32), the size of a rank-16 LoRA on
every linear layer of a 7B-class model. Each run is a fresh 3-site federation on
127.0.0.1 (``wardround.deploy.loopback``, the same machinery as
``bench/deploy_round.py``'s *after* mode: ``wardround coordinator start``,
``wardround site start``, ``wardround launch``), DP-SGD on, 2 steps of batch 4 per
round, with SecAgg+ (``secagg``) or plain float32 deltas (``plain``).

Measured per run:

* **Time.** A round's wall time at the coordinator minus its slowest site's training
  (the audit logs under SecAgg+), and minus the slowest evaluation as well.
* **Bytes.** What crossed the loopback interface during each round
  (``/proc/net/dev``, ``lo``; nothing else on the machine is expected to use it),
  and the time that many bytes take at the loopback speed measured in the same run
  (one TCP stream, ``sendall`` of an adapter-sized buffer, best of 3). The goal
  compares the round's time beyond training with that time.
* **Memory.** Every process of the coordinator and the sites is sampled (RSS, 20 Hz).
  A process that holds the base model (the ServerApp, a site's worker) has a floor
  that is not the adapter's, so the memory the adapter costs is measured as a slope:
  the same federation is run once more with an adapter of rank ``--small-rank``, and
  each process's peak difference is divided by the adapters' size difference. That
  is how many adapter-sized buffers the process holds at its peak.

Every process a run starts is stopped by PID at its end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(
    "deploy_round", BENCH / "deploy_round.py"
)
assert _spec is not None and _spec.loader is not None
deploy_round = importlib.util.module_from_spec(_spec)
sys.modules["deploy_round"] = deploy_round
_spec.loader.exec_module(deploy_round)

MEMORY_GOAL = 3.0
"""Peak memory per process: at most this many adapters' size."""
TIME_GOAL = 2.0
"""Plain transport: round time beyond training at most this many times the
time its loopback bytes take at loopback speed."""
SECTION = "bench:large-adapter"

RUN_TOML = """
[federation]
rounds = {rounds}
min-sites = 3
round-timeout-s = 3600
join-timeout-s = 300
seed = 1
[secure-aggregation]
enabled = {secagg}
stage-timeout-s = 3600
[privacy]
enabled = true
grad-sample-mode = "{grad_sample_mode}"
[model]
vision = "{vision}"
text = "{text}"
base = "random"
trainable = "all"
lora-rank = {rank}
lora-alpha = {alpha}
image-size = 64
max-note-tokens = 32
[train]
batch-size = 4
max-steps = 2
eval-batch-size = 8
"""


def save_encoders(folder: Path) -> tuple[Path, Path]:
    """ViT-Large/16 at 64 px and BERT-Large (standard configs, random weights)."""
    from transformers import AutoModel, BertConfig, ViTConfig

    large = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}
    configs = {
        "vit-large": ViTConfig(**large, intermediate_size=4096, image_size=64),
        "bert-large": BertConfig(**large, intermediate_size=4096),
    }
    for name, config in configs.items():
        if not (folder / name / "config.json").is_file():
            AutoModel.from_config(config).save_pretrained(folder / name)
    return folder / "vit-large", folder / "bert-large"


def adapter_size(run_toml: Path) -> dict[str, int]:
    """The adapter's and the base's sizes for this run (built in a child process)."""
    out = subprocess.run(
        [sys.executable, __file__, "--probe", str(run_toml)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _probe(run_toml: Path) -> dict[str, int]:
    """The adapter's parameters and float32 bytes, and the base's, for this run."""
    import tomllib

    from wardround.common.config import RunConfig
    from wardround.models.registry import build_model, describe

    built = build_model(RunConfig.from_mapping(tomllib.loads(run_toml.read_text())))
    info = describe(built)
    return {
        "adapter_parameters": int(info["trainable_parameters"]),
        "adapter_bytes": int(info["adapter_bytes_float32"]),
        "base_parameters": int(info["base_parameters"]),
        "base_bytes": int(info["base_model_bytes_float32"]),
    }


def _receive_into(
    server: socket.socket, received: bytearray, done: threading.Event
) -> None:
    conn, _ = server.accept()
    with conn:
        view, got = memoryview(received), 0
        while got < len(received):
            n = conn.recv_into(view[got:])
            if n == 0:
                break
            got += n
    done.set()


def loopback_bytes_per_s(nbytes: int, repeats: int = 3) -> float:
    """One TCP stream on 127.0.0.1: ``nbytes`` sent and received, best of ``repeats``."""
    payload = os.urandom(1 << 20) * max(1, nbytes >> 20)
    best = 0.0
    for _ in range(repeats):
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            received, done = bytearray(len(payload)), threading.Event()
            thread = threading.Thread(
                target=_receive_into, args=(server, received, done)
            )
            thread.start()
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(payload)
                done.wait()
            seconds = time.perf_counter() - start
            thread.join()
        best = max(best, len(payload) / seconds)
    return best


def loopback_counter() -> int:
    """Bytes the loopback interface has received since boot."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def role_of(proc: psutil.Process) -> str:
    """What a process of the federation is, from its command line."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    for role, words in (
        ("superlink", ("flower-superlink",)),
        ("serverapp", ("flwr-serverapp", "serverapp")),
        ("supernode", ("flower-supernode", "supernode_main")),
        ("clientapp", ("flwr-clientapp", "clientapp")),
        ("superexec", ("flower-superexec",)),
        ("site-daemon", ("site start",)),
        ("coordinator-daemon", ("coordinator start",)),
    ):
        if any(w in cmd for w in words):
            return role
    return Path(proc.name()).name


class Sampler:
    """RSS of every process under the federation's daemons, and the round ends."""

    def __init__(self, fed: Any, period_s: float = 0.05) -> None:
        self.fed, self.period_s = fed, period_s
        self.peaks: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.round_ends: list[tuple[float, int]] = []  # (time, lo bytes)
        self.launch_at: tuple[float, int] | None = None
        self.launch_rss: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Start sampling in a thread."""
        self._thread.start()

    def mark_launch(self) -> None:
        """Note the loopback counter and every process's RSS at the launch."""
        self.launch_at = (time.perf_counter(), loopback_counter())
        self.launch_rss = dict(self.first)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def _rounds_file(self) -> Path | None:
        dirs = self.fed.run_dirs()
        return dirs[-1] / "rounds.jsonl" if dirs else None

    def _run(self) -> None:
        lines = 0
        while not self._stop.wait(self.period_s):
            for key, daemon in list(self.fed.daemons.items()):
                for proc in daemon.family():
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    if proc.pid not in self.labels:
                        self.labels[proc.pid] = f"{key}/{role_of(proc)}"
                        self.first[proc.pid] = rss
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            if self.launch_at is None:
                continue
            path = self._rounds_file()
            if path is not None and path.is_file():
                count = len(path.read_text().splitlines())
                if count > lines:
                    stamp = (time.perf_counter(), loopback_counter())
                    self.round_ends.extend([stamp] * (count - lines))
                    lines = count


def run_once(root: Path, run_text: str, timeout_s: float) -> dict[str, Any]:
    """One fresh 3-site federation, one run; rounds, memory and loopback bytes."""
    fed = None
    sampler = None
    started = time.perf_counter()
    try:
        fed = deploy_round._federation(root, 3, deploy_round.LOOPBACK_PATIENTS)
        deploy_round._track(fed.start_coordinator().family())
        for name in fed.site_names:
            deploy_round._check(fed.enrol(name), f"wardround sites add {name}")
        for name in fed.site_names:
            deploy_round._track(fed.start_site(name).family())
        fed.wait_online(fed.site_names, timeout_s=300)
        run_toml = fed.run_toml("large-run.toml", run_text)
        fed.approve(fed.app_hash(run_toml), fed.site_names)
        sampler = Sampler(fed)
        sampler.start()
        time.sleep(1.0)  # a few samples of the idle processes
        sampler.mark_launch()
        launch_start = time.perf_counter()
        launched = fed.cli(
            "launch",
            "--config",
            str(run_toml),
            "--coordinator",
            str(fed.coordinator_toml),
            "--out",
            str(fed.root / "out" / "large-run"),
            timeout_s=timeout_s,
        )
        launch_s = time.perf_counter() - launch_start
        time.sleep(0.5)
        sampler.stop()
        deploy_round._check(launched, "wardround launch")
        run_dir = fed.run_dirs()[-1]
        raw = deploy_round.read_jsonl(run_dir / "rounds.jsonl")
        audited = deploy_round.site_train_seconds(
            {n: fed.site_state(n) / "audit.jsonl" for n in fed.site_names}
        )
        per_round = deploy_round._round_figures(
            raw, deploy_round._eval_time_key(raw), audited
        )
        # loopback bytes per round: between consecutive lines of rounds.jsonl
        # (line 0 is round 0, the initial evaluation)
        assert sampler.launch_at is not None
        marks = [sampler.launch_at, *sampler.round_ends]
        lo_bytes = {
            int(record["round"]): marks[i + 1][1] - marks[i][1]
            for i, record in enumerate(raw)
            if i + 1 < len(marks)
        }
        for row in per_round:
            row["loopback_bytes"] = lo_bytes.get(row["round"])
        processes = [
            {
                "process": sampler.labels[pid],
                "pid": pid,
                "before_launch_rss": sampler.launch_rss.get(pid),
                "peak_rss": sampler.peaks[pid],
            }
            for pid in sorted(sampler.labels, key=lambda p: sampler.labels[p])
        ]
        errors = deploy_round._errors_in_logs(fed.root)
        return {
            "per_round": per_round,
            "processes": processes,
            "launch_s": launch_s,
            "log_errors": errors[:20],
            "run_s": time.perf_counter() - started,
        }
    finally:
        if sampler is not None and sampler._thread.is_alive():
            sampler.stop()
        deploy_round._stop_mode(fed, [])


def _role_key(label: str) -> str:
    """'site-01/supernode' -> 'site/supernode'; coordinator labels unchanged."""
    owner, _, role = label.partition("/")
    return label if owner == "coordinator" else f"site/{role}"


def memory_slopes(
    large: dict[str, Any], small: dict[str, Any], delta_bytes: int
) -> dict[str, float]:
    """Per process role: (peak, large) - (peak, small), in adapter-size differences.

    Sites are matched by their label (site-01/worker in both runs), and a role's
    slope is the largest over its sites.
    """
    small_peaks = {p["process"]: p["peak_rss"] for p in small["processes"]}
    slopes: dict[str, float] = {}
    for proc in large["processes"]:
        if proc["process"] not in small_peaks:
            continue
        slope = (proc["peak_rss"] - small_peaks[proc["process"]]) / delta_bytes
        key = _role_key(proc["process"])
        slopes[key] = max(slopes.get(key, float("-inf")), slope)
    return slopes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure (or, with ``--from-json``, only report) and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=200)
    parser.add_argument(
        "--small-rank", type=int, default=8, help="0: no second run (no memory slope)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--transports", default="secagg,plain")
    parser.add_argument(
        "--grad-sample-mode",
        default="hooks",
        choices=("hooks", "ew", "functorch", "ghost"),
        help="the sites' privacy.grad-sample-mode (ghost: no per-example gradients)",
    )
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-docs", type=Path, default=None)
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only report the figures an earlier run wrote with --json",
    )
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(_probe(args.probe)))
        return {}
    if args.from_json is not None:
        figures = json.loads(args.from_json.read_text())
    else:
        figures = measure(args)
        figures["command"] = "python bench/large_adapter.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
    verdicts = goals(figures)
    figures["goals"] = verdicts
    for line in verdicts:
        print(f"{line['goal']}: {line['measured']} -- {line['verdict']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.write_docs:
        from wardround.simulations.reporting import write_marked_section

        write_marked_section(args.write_docs, SECTION, docs_section(figures))
        print(f"wrote the {SECTION} section of {args.write_docs}")
    return figures


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of this bench: sizes, loopback speed, per-round and memory figures."""
    import tempfile

    from wardround.simulations.reporting import machine_info

    load_start = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="wardround-large-"))
    vision, text = save_encoders(work / "encoders")
    figures: dict[str, Any] = {
        "machine": machine_info(),
        "load_average_start": round(load_start, 2),
        "rounds": args.rounds,
        "rank": args.rank,
        "small_rank": args.small_rank,
        "grad_sample_mode": args.grad_sample_mode,
        "runs": {},
    }
    sizes: dict[int, dict[str, int]] = {}
    ranks = (args.rank, args.small_rank) if args.small_rank else (args.rank,)
    for rank in ranks:
        probe = work / f"probe-{rank}.toml"
        probe.write_text(
            RUN_TOML.format(
                rounds=1,
                secagg="false",
                vision=vision,
                text=text,
                rank=rank,
                alpha=2 * rank,
                grad_sample_mode=args.grad_sample_mode,
            )
        )
        sizes[rank] = adapter_size(probe)
    figures["sizes"] = {str(k): v for k, v in sizes.items()}
    large_bytes = sizes[args.rank]["adapter_bytes"]
    figures["loopback_bytes_per_s"] = loopback_bytes_per_s(large_bytes)
    print(
        f"adapter: {sizes[args.rank]['adapter_parameters']:,} parameters "
        f"({large_bytes:,} B); "
        f"base {sizes[args.rank]['base_parameters']:,} parameters; loopback "
        f"{figures['loopback_bytes_per_s'] / 1e9:.2f} GB/s",
        flush=True,
    )
    for transport in args.transports.split(","):
        for rank in ranks:
            name = f"{transport}-r{rank}"
            text_ = RUN_TOML.format(
                rounds=args.rounds,
                secagg="true" if transport == "secagg" else "false",
                vision=vision,
                text=text,
                rank=rank,
                alpha=2 * rank,
                grad_sample_mode=args.grad_sample_mode,
            )
            print(f"[{name}] starting", flush=True)
            result = run_once(work / name, text_, args.timeout_s)
            figures["runs"][name] = result
            for row in result["per_round"]:
                print(
                    f"[{name}] round {row['round']}: wall {row['wall_s']:.2f} s, "
                    f"slowest train {row['slowest_train_s']:.2f} s, overhead "
                    f"{row['overhead_s']:.2f} s, loopback {row['loopback_bytes']} B",
                    flush=True,
                )
            for proc in result["processes"]:
                print(
                    f"[{name}] {proc['process']}: before launch "
                    f"{(proc['before_launch_rss'] or 0) / 2**20:.0f} MiB, peak "
                    f"{proc['peak_rss'] / 2**20:.0f} MiB",
                    flush=True,
                )
        if not args.small_rank:
            continue
        large = figures["runs"][f"{transport}-r{args.rank}"]
        small = figures["runs"][f"{transport}-r{args.small_rank}"]
        delta = large_bytes - sizes[args.small_rank]["adapter_bytes"]
        figures[f"{transport}_memory_slopes"] = memory_slopes(large, small, delta)
        print(f"[{transport}] memory slopes: {figures[f'{transport}_memory_slopes']}")
    figures["load_average_end"] = round(os.getloadavg()[0], 2)
    return figures


def _later_rounds(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Rounds 2.. (round 1 also loads the model at every site), or round 1 alone."""
    rows = [r for r in run["per_round"] if r["round"] >= 2]
    return rows or run["per_round"]


def time_ratio(figures: dict[str, Any], run: dict[str, Any]) -> float:
    """Median over rounds 2..R: time beyond training / loopback time of its bytes."""
    speed = figures["loopback_bytes_per_s"]
    ratios = [
        r["overhead_s"] / (r["loopback_bytes"] / speed)
        for r in _later_rounds(run)
        if r.get("loopback_bytes")
    ]
    return statistics.median(ratios)


def _complete(figures: dict[str, Any]) -> tuple[bool, int]:
    """Whether every round of every run had all 3 sites; log lines with errors."""
    complete = all(
        r["sites_trained"] == 3 and not r["failures"]
        for run in figures["runs"].values()
        for r in run["per_round"]
    )
    errors = sum(len(run["log_errors"]) for run in figures["runs"].values())
    return complete, errors


def goals(figures: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's goals for a large adapter, each measured, met or missed."""
    out: list[dict[str, str]] = []
    plain = figures["runs"].get(f"plain-r{figures['rank']}")
    if plain is not None:
        ratio = time_ratio(figures, plain)
        out.append(
            {
                "goal": "plain transport: round time beyond training <= "
                f"{TIME_GOAL:g} x the loopback time of its bytes",
                "measured": f"{ratio:.1f} x",
                "verdict": "met" if ratio <= TIME_GOAL else "missed",
            }
        )
    for transport in ("secagg", "plain"):
        slopes = figures.get(f"{transport}_memory_slopes")
        if not slopes:
            continue
        worst = max(slopes, key=lambda k: slopes[k])
        out.append(
            {
                "goal": f"{transport}: peak memory of every coordinator and site "
                f"process <= {MEMORY_GOAL:g} x the adapter",
                "measured": f"largest {slopes[worst]:.1f} x ({worst})",
                "verdict": "met" if slopes[worst] <= MEMORY_GOAL else "missed",
            }
        )
    complete, errors = _complete(figures)
    out.append(
        {
            "goal": "every round completes at every site, no gRPC message-size error",
            "measured": f"all rounds complete: {complete}; log lines with an error: "
            f"{errors}",
            "verdict": "met" if complete and errors == 0 else "missed",
        }
    )
    return out


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def docs_section(figures: dict[str, Any]) -> str:
    """The Markdown for docs/benchmarks.md: command, machine, tables, verdicts."""
    from wardround.simulations.reporting import describe_machine

    large = figures["sizes"][str(figures["rank"])]
    speed = figures["loopback_bytes_per_s"]
    lines = [
        "## A 40 M-parameter adapter through a deployed round (`bench/large_adapter.py`)",
        "",
        "Written by the command below; do not edit by hand.",
        "",
        f"```bash\n{figures['command']}\n```",
        "",
        f"Machine: {describe_machine(figures['machine'])}; load average "
        f"{figures['load_average_start']:.2f} at the start, "
        f"{figures['load_average_end']:.2f} at the end.",
        "",
        "3 sites on 127.0.0.1 (`wardround coordinator start`, `wardround site "
        "start`, `wardround launch`), 40 patients per site, DP-SGD on "
        f"(grad-sample-mode `{figures.get('grad_sample_mode', 'hooks')}`), 2 steps "
        f"of batch 4 per round. Base: ViT-Large/16 at 64 px and BERT-Large "
        f"(standard configs, random weights), {large['base_parameters']:,} "
        f"parameters. Adapter: LoRA of rank {figures['rank']} on both encoders' "
        f"attention projections and the fusion layers, "
        f"{large['adapter_parameters']:,} parameters, {large['adapter_bytes']:,} B "
        f"in float32. Loopback speed (one TCP stream, best of 3): "
        f"{speed / 1e9:.2f} GB/s.",
        "",
        "*Beyond training*: the round's wall time at the coordinator minus the "
        "slowest site's training. *Loopback bytes*: what crossed `lo` during the "
        "round; *loopback time*: those bytes at the loopback speed.",
        "",
        "| run | round | wall (s) | slowest train (s) | slowest eval (s) | beyond "
        "training (s) | loopback bytes | loopback time (s) | beyond training / "
        "loopback time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in figures["runs"].items():
        for r in run["per_round"]:
            moved = r.get("loopback_bytes")
            seconds = moved / speed if moved else None
            lines.append(
                f"| {name} | {r['round']} | {r['wall_s']:.1f} | "
                f"{r['slowest_train_s']:.1f} | "
                + (
                    f"{r['slowest_eval_s']:.1f}"
                    if r["slowest_eval_s"] is not None
                    else "—"
                )
                + f" | {r['overhead_s']:.1f} | "
                + (f"{moved:,}" if moved else "—")
                + " | "
                + (f"{seconds:.2f}" if seconds else "—")
                + " | "
                + (f"{r['overhead_s'] / seconds:.1f}" if seconds else "—")
                + " |"
            )
    lines += [
        "",
        "Peak RSS per process (MiB, sampled at 20 Hz) and, where the run with the "
        f"rank-{figures['small_rank']} adapter gives it, the *slope*: the peak's "
        "difference between the two runs over the adapters' size difference, the "
        "number of adapter-sized buffers the process holds at its peak. The site's "
        "worker (the ClientApp) runs in its `site start` process.",
        "",
        "| run | process | before launch (MiB) | peak (MiB) | slope (× adapter) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, run in figures["runs"].items():
        if not name.endswith(f"-r{figures['rank']}"):
            continue
        slopes = figures.get(f"{name.split('-')[0]}_memory_slopes") or {}
        for proc in run["processes"]:
            if proc["peak_rss"] < 32 * 2**20:
                continue  # nginx and the like
            slope = slopes.get(_role_key(proc["process"]))
            lines.append(
                f"| {name} | {proc['process']} | {_mib(proc['before_launch_rss'])} "
                f"| {_mib(proc['peak_rss'])} | "
                + (f"{slope:.1f}" if slope is not None else "—")
                + " |"
            )
    lines += ["", "| goal | measured | verdict |", "|---|---|---|"]
    for line in figures["goals"]:
        lines.append(f"| {line['goal']} | {line['measured']} | **{line['verdict']}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
