"""Per-round overhead on a deployed federation: Flower's default vs wardround's sites.

Run from the repository root::

    python bench/deploy_round.py [--rounds 4] [--patients 40] [--sites 3]
                                 [--secagg | --no-secagg] [--modes before,after]
                                 [--timeout-s 3600] [--keep] [--json OUT]

Each mode builds a fresh federation on 127.0.0.1 in a fresh temporary folder
(``wardround.deploy.loopback.LoopbackFederation``: a CA and server certificate, one
key per site, synthetic sites with a ``[deployment]`` section, a coordinator.toml),
starts the coordinator, enrols every site with ``wardround sites add``, starts the
sites, approves the run's app hash at every site, runs ``wardround launch`` and
reads ``rounds.jsonl`` from the run directory under the coordinator's state folder.
The run is like the deployment tests' ``FAST_RUN`` (32-pixel images, 32 note
tokens, batch size 8, DP on, SecAgg+ per ``--secagg``), with timeouts long enough
for the slower baseline.

Modes:

* ``before`` -- Flower's default. Every site is a plain ``flower-supernode`` started
  by this script (``--isolation subprocess``: a fresh ``flwr-clientapp`` process per
  message, which imports wardround and rebuilds the model and the data each time;
  the SuperNode asks for work every 3 s), and the coordinator runs with
  ``WARDROUND_FLOWER_PACING=0`` (the ServerApp uses Flower's own Grid polling and
  array-pull backoff). In this baseline the site's app-approval check is not
  applied: Flower's own ClientApp process runs the app, whatever its hash. That is
  why wardround does not offer this mode to operators; here it is only the
  yardstick.
* ``after`` -- ``wardround site start`` per site: the SuperNode under
  ``--isolation process`` with wardround's pacing, and the site's warm worker
  (model and data loaded once, approvals checked) taking its ClientApp tasks; the
  coordinator with its pacing on (the default).

Overhead of a round = the round's wall time at the coordinator (``seconds`` of the
round's line in rounds.jsonl, rounds >= 1; it covers training, aggregation and the
evaluation of the new adapter) minus the slowest site's local training time
(``train[i].seconds``, or the sites' audit logs under SecAgg+). *Beyond train +
eval* also takes off the slowest site's evaluation time, where the evaluate entries
carry one (``seconds``); the coordinator's time in each phase is
``extra.phase_seconds``. Round 1
includes one-off warm-up (first messages of the run, first torch calls at the
sites), so the headline figure is the median over rounds 2..R; the median over all
rounds is shown as well. Every process the script starts is stopped by PID at the
end of each mode, also on Ctrl-C or SIGTERM, and the script checks that none is
left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from wardround.deploy.loopback import (
    LoopbackFederation,
    free_port,
    read_jsonl,
)
from wardround.flower_compat.pacing import PACING_ENV
from wardround.ops.processes import start_child, stop_processes
from wardround.synthetic.hospitals import synthesize_federation

ALL_MODES = ("before", "after")
LOOPBACK_PATIENTS = 40  # what LoopbackFederation.create synthesizes per site
OVERHEAD_GOAL_S = 1.0
"""The goal: a deployed round's overhead beyond its slowest site's training."""

RUN_TOML = """
[federation]
rounds = {rounds}
min-sites = {min_sites}
round-timeout-s = {round_timeout}
join-timeout-s = 60
seed = 1
[secure-aggregation]
enabled = {secagg}
stage-timeout-s = {round_timeout}
[privacy]
enabled = true
[model]
image-size = 32
max-note-tokens = 32
[train]
batch-size = 8
"""

# What `wardround site start` sets for its SuperNode (ops.env.apply_machine_hygiene).
SUPERNODE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}

# Every process this script started (or found under one it started), for the
# final check that none is left.
TRACKED: dict[int, psutil.Process] = {}


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so that every ``finally`` runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted()


def _track(processes: list[psutil.Process]) -> list[psutil.Process]:
    for proc in processes:
        TRACKED.setdefault(proc.pid, proc)
    return processes


def _family(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:  # is_running() also checks the create time: a reused PID is not ours
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextmanager
def _env(name: str, value: str | None):
    """``os.environ[name] = value`` (None: unset) for the processes started inside."""
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _federation(root: Path, sites: int, patients: int) -> LoopbackFederation:
    fed = LoopbackFederation.create(root, sites=sites)
    if patients != LOOPBACK_PATIENTS:
        # create() synthesizes 40 patients per site: rewrite the sites (same seed)
        # and their [deployment] sections, keeping the PKI and keys it wrote.
        synthesize_federation(root / "sites", sites, patients_per_site=patients, seed=5)
        for name in fed.site_names:
            fed.add_deployment(name, key=root / "keys" / f"{name}.key")
    return fed


def _plain_supernode(fed: LoopbackFederation, name: str) -> subprocess.Popen[bytes]:
    """Flower's own ``flower-supernode`` for site ``name`` (default isolation)."""
    bin_dir = Path(sys.executable).parent
    site_toml = fed.site_toml(name).resolve()
    home = fed.site_state(name) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SUPERNODE_ENV, "FLWR_HOME": str(home)}
    env.pop(PACING_ENV, None)
    command = [
        str(bin_dir / "flower-supernode"),
        "--superlink",
        f"127.0.0.1:{fed.port}",
        "--root-certificates",
        str((fed.root / "pki" / "ca.pem").resolve()),
        "--auth-supernode-private-key",
        str((fed.root / "keys" / f"{name}.key").resolve()),
        "--node-config",
        f"site-config='{site_toml}'",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    # start_child puts this interpreter's bin/ first on PATH (flwr-clientapp is
    # started by name) and makes the node die with this script.
    return start_child(command, env, fed.root / "logs" / f"{name}-supernode.log")


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {result.returncode}):\n"
            + (result.stdout + result.stderr)[-3000:]
        )


def _stop_mode(
    fed: LoopbackFederation | None, nodes: list[subprocess.Popen[bytes]]
) -> None:
    """Stop this mode's sites and coordinator, by PID, children included.

    Sites first (plain SuperNodes or site daemons, all at once), the coordinator
    last: a site whose coordinator is already gone may sit in a reconnect backoff
    and only go at the SIGKILL.
    """
    sites = [p for node in nodes for p in _family(node.pid)]
    if fed is not None:
        for key, daemon in fed.daemons.items():
            family = _track(daemon.family())
            if key != "coordinator":
                sites.extend(family)
    stop_processes(_track(sites), grace_s=20)
    for node in nodes:
        try:
            node.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.kill()
    if fed is not None:
        fed.stop_all()  # the coordinator (and anything of the sites still there)
        for daemon in fed.daemons.values():
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(timeout=10)


def site_train_seconds(audit_paths: dict[str, Path]) -> dict[int, tuple[str, float]]:
    """Round -> (site, seconds) of the slowest site's training, from the sites' audits.

    Under SecAgg+ a site keeps its training time at home (its answer policy), so
    the coordinator's rounds.jsonl has none; each site daemon's audit log records
    the time its ClientApp spent on every task (``app_seconds``). The longest train
    task of a round is its training (the other SecAgg+ stages take milliseconds).
    """
    from wardround.ops.audit import read_audit

    slowest: dict[int, tuple[str, float]] = {}
    for site, path in audit_paths.items():
        if not path.is_file():
            continue
        for entry in read_audit(path):
            if entry.get("event") != "round_finished" or entry.get("round") is None:
                continue
            if not str(entry.get("message_type", "")).startswith("train"):
                continue
            seconds = float(entry.get("app_seconds") or 0.0)
            current = slowest.get(int(entry["round"]))
            if current is None or seconds > current[1]:
                slowest[int(entry["round"])] = (site, seconds)
    return slowest


def _round_figures(
    rounds: list[dict[str, Any]],
    eval_key: str | None,
    audited: dict[int, tuple[str, float]] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for record in rounds:
        if int(record["round"]) < 1:
            continue
        train = [
            t
            for t in record.get("train") or []
            if isinstance(t.get("seconds"), int | float)
            and math.isfinite(float(t["seconds"]))
        ]
        slowest = max(train, key=lambda t: float(t["seconds"])) if train else None
        train_s = float(slowest["seconds"]) if slowest else float("nan")
        if slowest is None and audited and int(record["round"]) in audited:
            site, train_s = audited[int(record["round"])]
            slowest = {"site": site}
        eval_s = None
        if eval_key is not None and record.get("evaluate"):
            eval_s = max(float(e[eval_key]) for e in record["evaluate"])
        wall = float(record["seconds"])
        phases = (record.get("extra") or {}).get("phase_seconds") or {}
        rows.append(
            {
                "round": int(record["round"]),
                "wall_s": wall,
                "slowest_train_s": train_s,
                "slowest_train_site": slowest["site"] if slowest else None,
                "slowest_eval_s": eval_s,
                # the goal's overhead: beyond the slowest site's training
                "overhead_s": wall - train_s,
                # and beyond the local work on the critical path (training and the
                # slowest evaluation), where the sites report their evaluation time
                "overhead_beyond_work_s": (
                    wall - train_s - eval_s if eval_s is not None else None
                ),
                "train_phase_s": phases.get("train"),
                "evaluate_phase_s": phases.get("evaluate"),
                "sites_trained": len(record.get("train") or []),
                "sites_evaluated": len(record.get("evaluate") or []),
                "aggregation": record.get("aggregation"),
                "aggregation_s": record.get("aggregation_seconds"),
                "failures": len(record.get("failures") or []),
            }
        )
    return rows


def _eval_time_key(rounds: list[dict[str, Any]]) -> str | None:
    """The evaluate entries' time field, if every entry has one."""
    entries = [
        e for r in rounds if int(r["round"]) >= 1 for e in r.get("evaluate") or []
    ]
    for key in ("seconds", "eval_seconds", "evaluate_seconds"):
        if entries and all(isinstance(e.get(key), int | float) for e in entries):
            return key
    return None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One federation, one run; the per-round figures and the mode's timings."""
    started = time.perf_counter()
    fed: LoopbackFederation | None = None
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        fed = _federation(root, args.sites, args.patients)
        with _env(PACING_ENV, "0" if mode == "before" else None):
            coordinator = fed.start_coordinator()
        _track(coordinator.family())
        for name in fed.site_names:
            _check(fed.enrol(name), f"wardround sites add {name}")
        for name in fed.site_names:
            if mode == "before":
                node = _plain_supernode(fed, name)
                nodes.append(node)
                _track(_family(node.pid))
            else:
                with _env(PACING_ENV, None):
                    _track(fed.start_site(name).family())
        fed.wait_online(fed.site_names, timeout_s=args.online_timeout_s)
        online_s = time.perf_counter() - started

        run_toml = fed.run_toml(
            "bench-run.toml",
            RUN_TOML.format(
                rounds=args.rounds,
                secagg="true" if args.secagg else "false",
                # sites refuse SecAgg+ among fewer than 3
                min_sites=3 if args.secagg else 2,
                round_timeout=args.round_timeout_s,
            ),
        )
        fed.approve(fed.app_hash(run_toml), fed.site_names)
        known = set(fed.run_dirs())
        launch_start = time.perf_counter()
        launched = fed.cli(
            "launch",
            "--config",
            str(run_toml),
            "--coordinator",
            str(fed.coordinator_toml),
            "--out",
            str(fed.root / "out" / "bench-run"),
            timeout_s=args.timeout_s,
        )
        launch_s = time.perf_counter() - launch_start
        _check(launched, "wardround launch")
        new = sorted(set(fed.run_dirs()) - known)
        if len(new) != 1:
            raise RuntimeError(f"expected one new run directory, found {new}")
        rounds = read_jsonl(new[0] / "rounds.jsonl")
        for daemon in fed.daemons.values():
            _track(daemon.family())
        for node in nodes:
            _track(_family(node.pid))
        audited = site_train_seconds(
            {name: fed.site_state(name) / "audit.jsonl" for name in fed.site_names}
        )
        return {
            "mode": mode,
            "root": str(root),
            "run_dir": str(new[0]),
            "rounds_raw": rounds,
            "site_train_seconds": audited,
            "online_s": online_s,
            "launch_s": launch_s,
        }
    finally:
        stop_start = time.perf_counter()
        _stop_mode(fed, nodes)
        print(
            f"[{mode}] stopped its processes in {time.perf_counter() - stop_start:.1f} s; "
            f"mode took {time.perf_counter() - started:.1f} s in all",
            flush=True,
        )


def _errors_in_logs(root: Path) -> list[str]:
    """Lines of the mode's logs that report an error (for the reader, not a verdict)."""
    found = []
    logs = [*sorted((root / "logs").glob("*.log"))]
    logs += sorted((root / "coordinator-state").glob("*.log"))
    logs += sorted((root / "site-state").glob("*/*.log"))
    for path in logs:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if any(w in line for w in ("ERROR", "Traceback", "CRITICAL")):
                found.append(f"{path.relative_to(root)}: {line.strip()[:160]}")
    return found


def _fmt(value: float | None, width: int = 9, digits: int = 2) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its table; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--patients", type=int, default=40, help="per site")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument(
        "--secagg",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SecAgg+ on (default) or off; DP is on either way",
    )
    parser.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help="comma-separated, run in this order (default before,after)",
    )
    parser.add_argument("--round-timeout-s", type=float, default=900.0)
    parser.add_argument("--online-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=3600.0,
        help="limit for each wardround launch",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folders (logs, runs)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--write-docs",
        type=Path,
        metavar="MARKDOWN",
        help="rewrite this file's deploy-round section (docs/benchmarks.md)",
    )
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        parser.error(f"--modes takes {', '.join(ALL_MODES)} (got {args.modes!r})")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    # Ctrl-C and SIGTERM raise KeyboardInterrupt (also where SIGINT was inherited
    # as ignored, e.g. started with `&` from a script), so every `finally` runs.
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    load_start = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    roots: dict[str, Path] = {}
    failed: dict[str, str] = {}
    try:
        for mode in modes:
            roots[mode] = Path(tempfile.mkdtemp(prefix=f"wr-deploy-{mode}-"))
            print(f"[{mode}] federation in {roots[mode]}", flush=True)
            mode_start = time.perf_counter()
            try:
                results[mode] = run_mode(mode, args, roots[mode])
            except Exception as exc:  # noqa: BLE001 - report it, go on to the next mode
                failed[mode] = f"{type(exc).__name__}: {exc}"
                print(f"[{mode}] FAILED: {failed[mode]}", flush=True)
                continue
            results[mode]["mode_s"] = time.perf_counter() - mode_start
            results[mode]["log_errors"] = _errors_in_logs(roots[mode])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        alive = [p for p in TRACKED.values() if _alive(p)]
        if alive:
            stop_processes(alive, grace_s=10)
            alive = [p for p in alive if _alive(p)]
        print(
            f"processes started by this benchmark: {len(TRACKED)}; still alive: "
            + (", ".join(str(p.pid) for p in alive) if alive else "none")
        )
        for mode, root in roots.items():
            if args.keep or mode not in results:
                print(f"[{mode}] kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)

    eval_key = _eval_time_key(
        [r for res in results.values() for r in res["rounds_raw"]]
    )
    figures: dict[str, Any] = {
        "sites": args.sites,
        "patients_per_site": args.patients,
        "rounds": args.rounds,
        "secure_aggregation": args.secagg,
        "differential_privacy": True,
        "evaluate_time_key": eval_key,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "modes": {},
    }
    for mode, res in results.items():
        rows = _round_figures(
            res["rounds_raw"], eval_key, res.get("site_train_seconds")
        )
        later = [r["overhead_s"] for r in rows if r["round"] >= 2]
        figures["modes"][mode] = {
            "per_round": rows,
            "median_overhead_s_rounds_2_on": _median(later),
            "median_overhead_beyond_work_s_rounds_2_on": _median(
                [
                    r["overhead_beyond_work_s"]
                    for r in rows
                    if r["round"] >= 2 and r["overhead_beyond_work_s"] is not None
                ]
            ),
            "median_overhead_s_all_rounds": _median([r["overhead_s"] for r in rows]),
            "median_wall_s_rounds_2_on": _median(
                [r["wall_s"] for r in rows if r["round"] >= 2]
            ),
            "median_slowest_train_s_rounds_2_on": _median(
                [r["slowest_train_s"] for r in rows if r["round"] >= 2]
            ),
            "round0_evaluate_s": next(
                (
                    float(r["seconds"])
                    for r in res["rounds_raw"]
                    if int(r["round"]) == 0
                ),
                None,
            ),
            "online_s": res["online_s"],
            "launch_s": res["launch_s"],
            "mode_s": res["mode_s"],
            "log_errors": res["log_errors"][:50],
        }

    local = "slowest train + slowest evaluation" if eval_key else "slowest train"
    print()
    print(
        f"Per-round overhead on a deployed federation: {args.sites} sites on 127.0.0.1, "
        f"{args.patients} patients per site, {args.rounds} rounds, DP on, "
        f"SecAgg+ {'on' if args.secagg else 'off'}"
    )
    print(f"overhead = round wall time at the coordinator - {local}")
    if eval_key is None:
        print(
            "(the evaluate entries of rounds.jsonl carry no time: the evaluation stays "
            "inside the overhead)"
        )
    header = f"{'mode':8}{'round':>6}{'wall (s)':>10}{'train (s)':>11}"
    header += f"{'eval (s)':>10}" if eval_key else ""
    header += f"{'overhead':>10}{'sites':>7}  aggregation"
    print(header)
    for mode, fig in figures["modes"].items():
        for r in fig["per_round"]:
            line = f"{mode:8}{r['round']:>6}{_fmt(r['wall_s'], 10)}{_fmt(r['slowest_train_s'], 11)}"
            line += _fmt(r["slowest_eval_s"], 10) if eval_key else ""
            line += f"{_fmt(r['overhead_s'], 10)}{r['sites_trained']:>7}  {r['aggregation']}"
            if r["failures"]:
                line += f" ({r['failures']} failures)"
            print(line)

    before = figures["modes"].get("before", {})
    after = figures["modes"].get("after", {})

    def ratio(key: str) -> float | None:
        b, a = before.get(key), after.get(key)
        return b / a if b is not None and a else None

    print()
    print(f"{'':36}{'before':>10}{'after':>10}{'before/after':>14}")
    summary = (
        ("median overhead, rounds 2..R (s)", "median_overhead_s_rounds_2_on"),
        ("median overhead, all rounds (s)", "median_overhead_s_all_rounds"),
        (
            "median beyond train + eval, 2..R (s)",
            "median_overhead_beyond_work_s_rounds_2_on",
        ),
        ("median round wall, rounds 2..R (s)", "median_wall_s_rounds_2_on"),
        ("median slowest train, 2..R (s)", "median_slowest_train_s_rounds_2_on"),
        ("round 0 (evaluation only) (s)", "round0_evaluate_s"),
        ("start to sites online (s)", "online_s"),
        ("wardround launch (s)", "launch_s"),
        ("mode in all (s)", "mode_s"),
    )
    ratios = {}
    for label, key in summary:
        r = ratio(key)
        ratios[key] = r
        print(
            f"{label:36}{_fmt(before.get(key), 10)}{_fmt(after.get(key), 10)}"
            f"{_fmt(r, 14)}"
        )
    figures["ratios_before_over_after"] = ratios
    print(
        "round 1 includes one-off warm-up (first messages of the run, first torch calls); "
        "rounds 2..R is the steady state"
        + ("" if args.rounds >= 2 else " (none here: --rounds 1)")
    )
    for mode, fig in figures["modes"].items():
        errors = fig["log_errors"]
        print(
            f"[{mode}] log lines with ERROR/Traceback/CRITICAL: {len(errors)}"
            + ("" if not errors else " (first: " + errors[0] + ")")
        )
    if failed:
        figures["failed_modes"] = failed
        for mode, reason in failed.items():
            print(f"[{mode}] failed, no figures: {reason.splitlines()[0]}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.write_docs:
        from wardround.simulations.reporting import write_marked_section

        figures["load_average_end"] = round(os.getloadavg()[0], 2)
        write_marked_section(
            args.write_docs, DOCS_SECTION, docs_section(figures, argv, load_start)
        )
        print(f"wrote the {DOCS_SECTION} section of {args.write_docs}")
    return figures


DOCS_SECTION = "bench:deploy-round"


def docs_section(
    figures: dict[str, Any], argv: list[str] | None, load_start: float
) -> str:
    """The Markdown for docs/benchmarks.md: command, machine, table, verdict."""
    import flwr
    import torch

    from wardround.simulations.reporting import describe_machine, machine_info

    command = "python bench/deploy_round.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    modes = figures["modes"]
    lines = [
        "## Deployment round overhead (3 sites on loopback)",
        "",
        "Written by the command below; do not edit by hand.",
        "",
        f"```bash\n{command.strip()}\n```",
        "",
        f"Machine: {describe_machine(machine_info())}; load average "
        f"{load_start:.2f} at the start, {figures['load_average_end']:.2f} at the end. "
        f"Versions: flwr {flwr.__version__}, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}.",
        "",
        f"{figures['sites']} sites, {figures['patients_per_site']} patients per site, "
        f"{figures['rounds']} rounds, DP-SGD on, SecAgg+ "
        f"{'on' if figures['secure_aggregation'] else 'off'}. *Overhead* = the "
        "round's wall time at the coordinator minus the slowest site's local "
        "training time, the goal's measure; *beyond train + eval* also takes off the "
        "slowest site's evaluation of the new adapter, where the sites report it. "
        "*Train* and *evaluate phase*: the coordinator's time in each phase. "
        "*before* = Flower's default: a plain `flower-supernode` per site with "
        "`--isolation subprocess` (a fresh ClientApp process per message) and "
        "Flower's own polling; *after* = `wardround site start` (warm worker, "
        "paced polling). Under SecAgg+ a site keeps its training time home; the "
        "*after* sites' audit logs give it, Flower's plain SuperNodes keep none "
        "(—).",
        "",
        "| mode | round | wall (s) | train phase (s) | evaluate phase (s) "
        "| slowest train (s) | slowest eval (s) | overhead (s) "
        "| beyond train + eval (s) | sites |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, fig in modes.items():
        for row in fig["per_round"]:
            lines.append(
                f"| {mode} | {row['round']} | {row['wall_s']:.2f} | "
                f"{_cell(row.get('train_phase_s'))} | "
                f"{_cell(row.get('evaluate_phase_s'))} | "
                f"{_cell(row['slowest_train_s'])} | {_cell(row['slowest_eval_s'])} | "
                f"{_cell(row['overhead_s'])} | "
                f"{_cell(row.get('overhead_beyond_work_s'))} | "
                f"{row['sites_trained']} |"
            )
    lines += ["", "| | before | after | before / after |", "|---|---:|---:|---:|"]
    ratios = figures.get("ratios_before_over_after", {})
    for label, key in (
        ("median overhead, rounds 2..R (s)", "median_overhead_s_rounds_2_on"),
        (
            "median beyond train + eval, rounds 2..R (s)",
            "median_overhead_beyond_work_s_rounds_2_on",
        ),
        ("median round wall, rounds 2..R (s)", "median_wall_s_rounds_2_on"),
        ("median slowest train, rounds 2..R (s)", "median_slowest_train_s_rounds_2_on"),
    ):
        before = modes.get("before", {}).get(key)
        after = modes.get("after", {}).get(key)
        ratio = ratios.get(key)
        lines.append(f"| {label} | {_cell(before)} | {_cell(after)} | {_cell(ratio)} |")
    after_overhead = modes.get("after", {}).get("median_overhead_s_rounds_2_on")
    if after_overhead is not None:
        verdict = "met" if after_overhead <= OVERHEAD_GOAL_S else "missed"
        lines += [
            "",
            f"Goal: overhead ≤ {OVERHEAD_GOAL_S:g} s per round — **{verdict}** "
            f"({after_overhead:.2f} s, median of rounds 2..R).",
        ]
    for mode, reason in figures.get("failed_modes", {}).items():
        lines.append(f"\nMode `{mode}` failed: {reason.splitlines()[0]}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    """Two decimals, or a dash where the figure is unknown (None or NaN)."""
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}"


if __name__ == "__main__":
    try:
        sys.exit(1 if main().get("failed_modes") else 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
