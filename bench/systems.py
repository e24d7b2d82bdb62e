"""Systems benchmarks in one command: every figure and ratio measured in this run.

Run from the repository root, in the project's venv::

    python bench/systems.py [--quick] [--json PATH] [--write-docs] [--docs FILE]
    python bench/systems.py --from-json PATH --docs FILE   # rewrite the docs only

1. **Upload per site per round vs adapter vs full model**: wardround's round loop
   with the sites' real ClientApps on an in-process grid (Flower's wire encoding),
   the default model with DP-SGD, once in the clear and once under SecAgg+; then
   the same at base size (ViT-Base and BERT-Base encoders built from their
   standard configs, random weights), without DP.
2. **DP-SGD step vs plain step** (time, memory): ``bench/dp_step.py --modes hooks``
   (wardround's default ``grad_sample_mode``), in its own subprocesses.
3. **SecAgg+ round vs plain round** (time, bytes, protocol only):
   ``bench/secagg_round.py``; item 1 gives the bytes of real rounds.
4. **Simulation scaling**: the same patients split over 2, 4, 8 and 16 synthetic
   sites, each a ``wardround simulate`` run (Flower's simulation engine, Ray, the
   default DP-SGD + SecAgg+ config): round time from ``rounds.jsonl``, wall time
   and peak memory (PSS over the command's process tree) from
   ``bench/simulate_footprint.py``'s sampler.
5. **Server aggregation time vs round time**: from the same runs' ``rounds.jsonl``.

``--write-docs`` rewrites the ``bench:systems`` section of ``docs/benchmarks.md``
and its plot; nothing else in the file changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import simulate_footprint  # bench/ is on sys.path when this file runs as a script

from wardround.ops.cache_dir import cache_root

BENCH = Path(__file__).resolve().parent
DOCS_SECTION = "bench:systems"
GOALS = {
    "upload_plain": 1.05,
    "upload_secagg": 1.5,
    "adapter_share": 0.02,
    "scaling_16_vs_2": 1.3,  # issue 16: mean round time at most 1.3x
}


# -- 1. bytes ---------------------------------------------------------------------
def _federation(config: Any, sites: int, run_dir: Path) -> Any:
    from wardround.simulations.in_process import run_in_process

    return run_in_process(config, run_dir, n_sites=sites)


def _upload(result: Any) -> dict[str, Any]:
    sent = [t.bytes_sent for r in result.rounds[1:] for t in r.train]
    model = result.summary["model"]
    return {
        "upload_bytes_per_site_per_round": statistics.mean(sent),
        "adapter_payload_bytes": model["adapter_payload_bytes"],
        "base_model_bytes": model["base_model_bytes_float32"],
        "adapter_parameters": model["trainable_parameters"],
        "base_parameters": model["base_parameters"],
    }


def _base_size_encoders(folder: Path) -> tuple[str, str]:
    """ViT-Base and BERT-Base from their standard configs (random init), saved."""
    from transformers import AutoModel, BertConfig, ViTConfig

    paths = []
    for name, config in (("vit-base", ViTConfig()), ("bert-base", BertConfig())):
        path = folder / name
        AutoModel.from_config(config).save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def measure_upload(work: Path, *, quick: bool, base_size: bool) -> dict[str, Any]:
    """Bytes per site per round, adapter and base sizes, in the clear and under SecAgg+."""
    from wardround.common.config import RunConfig
    from wardround.synthetic.hospitals import synthesize_federation

    sites_dir = work / "upload-sites"
    synthesize_federation(sites_dir, 3, patients_per_site=40, seed=0)
    base = RunConfig().with_overrides(
        data={"sites_dir": str(sites_dir)},
        federation={"rounds": 2, "min_sites": 3},
        train={"max_steps": 2},
    )
    out: dict[str, Any] = {}
    for name, secure in (("plain", False), ("secagg", True)):
        config = base.with_overrides(secure_aggregation={"enabled": secure})
        out[f"default_{name}"] = _upload(_federation(config, 3, work / f"up-{name}"))
    if base_size and not quick:
        vision, text = _base_size_encoders(work / "encoders")
        big = base.with_overrides(
            model={"vision": vision, "text": text, "hidden_size": 256},
            federation={"rounds": 1, "min_sites": 3},
            train={"max_steps": 1, "batch_size": 4, "eval_batch_size": 8},
            privacy={"enabled": False},
        )
        # three sites: the fewest SecAgg+ runs with
        small_sites = work / "upload-sites-small"
        synthesize_federation(small_sites, 3, patients_per_site=15, seed=0)
        big = big.with_overrides(data={"sites_dir": str(small_sites)})
        for name, secure in (("plain", False), ("secagg", True)):
            config = big.with_overrides(secure_aggregation={"enabled": secure})
            out[f"base_{name}"] = _upload(_federation(config, 3, work / f"upb-{name}"))
    return out


# -- 2., 3. the existing benchmark scripts ---------------------------------------------
def run_script(script: str, args: list[str], work: Path) -> dict[str, Any]:
    """Run ``bench/<script>`` with ``--json``; its figures (its output is shown)."""
    out = work / f"{Path(script).stem}.json"
    cmd = [sys.executable, str(BENCH / script), *args, "--json", str(out)]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


# -- 4., 5. scaling --------------------------------------------------------------------
def measure_scaling(
    work: Path,
    site_counts: list[int],
    total_patients: int,
    rounds: int,
    *,
    secure: bool = False,
) -> dict[str, Any]:
    """``wardround simulate`` over the same patients split over each site count.

    In the clear unless ``secure`` (SecAgg+ needs 3 sites): the same aggregation at
    every count, so the ratio between counts is the per-site cost of the engine.
    """
    out = {}
    for sites in site_counts:
        tag = f"{sites}-secagg" if secure else str(sites)
        run_dir = work / f"scale-{tag}"
        config = work / f"scale-{tag}.toml"
        config.write_text(
            f"[data]\npatients-per-site = {total_patients // sites}\n"
            f"[federation]\nrounds = {rounds}\n"
        )
        cmd = [
            sys.executable,
            "-P",  # the working directory must not shadow the installed package
            "-m",
            "wardround.cli",
            "simulate",
            "--sites",
            str(sites),
            "--config",
            str(config),
            "--out",
            str(run_dir),
            "--secagg" if secure else "--no-secagg",
        ]
        # No sigma remembered from an earlier count: the run's first site searches,
        # the others read its answer (client/sigma_cache.py).
        shutil.rmtree(cache_root() / "sigma", ignore_errors=True)
        print(f"$ wardround {' '.join(cmd[4:])} ... ", end="", flush=True)
        footprint = simulate_footprint.measure(cmd)
        if footprint["returncode"] != 0:
            raise SystemExit(f"wardround simulate --sites {sites} failed")
        lines = [
            json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()
        ]
        trained = [r for r in lines if r["round"] > 0]
        out[str(sites)] = {
            "patients_per_site": total_patients // sites,
            "wall_seconds": footprint["wall_seconds"],
            "peak_pss_mib": footprint["peak_pss_bytes"] / 2**20,
            "round_seconds": [r["seconds"] for r in trained],
            "mean_round_seconds": statistics.mean(r["seconds"] for r in trained),
            "mean_aggregation_seconds": statistics.mean(
                r["aggregation_seconds"] for r in trained
            ),
            "aggregation": sorted({r["aggregation"] for r in trained}),
            "final_auroc": trained[-1]["global_auroc"],
        }
        # Local training alone, summed over the round's sites (ClientApp-timed).
        # Under SecAgg+ a site keeps its training time home (aggregate-only).
        timed = [[t["seconds"] for t in r["train"]] for r in trained]
        if all(None not in ts for ts in timed):
            out[str(sites)]["mean_site_training_seconds"] = statistics.mean(
                sum(ts) for ts in timed
            )
        print(
            f"{footprint['wall_seconds']:.0f} s, rounds "
            f"{out[str(sites)]['mean_round_seconds']:.1f} s",
            flush=True,
        )
    return out


# -- the report --------------------------------------------------------------------------
def verdicts(figures: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each of the issue's systems goals."""
    up = figures["upload"]
    plain, secure = up["default_plain"], up["default_secagg"]
    adapter = plain["adapter_payload_bytes"]
    rows = [
        (
            f"upload per site per round ≤ {GOALS['upload_plain']} × adapter (no SecAgg+)",
            f"{plain['upload_bytes_per_site_per_round']:,.0f} B vs {adapter:,} B: "
            f"{plain['upload_bytes_per_site_per_round'] / adapter:.3f}×",
            plain["upload_bytes_per_site_per_round"] / adapter <= GOALS["upload_plain"],
        ),
        (
            f"upload per site per round ≤ {GOALS['upload_secagg']} × adapter (SecAgg+)",
            f"{secure['upload_bytes_per_site_per_round']:,.0f} B: "
            f"{secure['upload_bytes_per_site_per_round'] / adapter:.3f}×",
            secure["upload_bytes_per_site_per_round"] / adapter
            <= GOALS["upload_secagg"],
        ),
    ]
    for key, label in (
        ("default_plain", "default (tiny) model"),
        ("base_plain", "base size"),
    ):
        if key in up:
            share = up[key]["adapter_payload_bytes"] / up[key]["base_model_bytes"]
            rows.append(
                (
                    f"adapter ≤ {GOALS['adapter_share']:.0%} of the full model, {label}",
                    f"{up[key]['adapter_payload_bytes']:,} B of "
                    f"{up[key]['base_model_bytes']:,} B: {share:.2%}",
                    share <= GOALS["adapter_share"],
                )
            )
    scaling = figures["scaling"]
    if "2" in scaling and "16" in scaling:
        scaling = {
            n: {
                **entry,
                "mean_later_round_seconds": statistics.mean(
                    entry["round_seconds"][1:] or entry["round_seconds"]
                ),
            }
            for n, entry in scaling.items()
        }
        for key, label in (
            ("mean_round_seconds", "round time"),
            ("mean_later_round_seconds", "rounds after the first"),
            ("wall_seconds", "command wall time"),
        ):
            ratio = scaling["16"][key] / scaling["2"][key]
            rows.append(
                (
                    f"same data over 16 sites ≤ {GOALS['scaling_16_vs_2']} × 2 sites ({label})",
                    f"{scaling['16'][key]:.1f} s vs {scaling['2'][key]:.1f} s: {ratio:.2f}×",
                    ratio <= GOALS["scaling_16_vs_2"],
                )
            )
    return rows


def _later(round_seconds: list[float]) -> str:
    """Mean of the rounds after the first (which also plans each site's DP noise)."""
    later = round_seconds[1:]
    return f"{statistics.mean(later):.1f}" if later else "—"


def _verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "reported"}[met]


def render(figures: dict[str, Any], plot: Path | None, docs_dir: Path) -> str:
    """The ``bench:systems`` section of docs/benchmarks.md."""
    import os

    from wardround.simulations.reporting import describe_machine

    m, v = figures["machine"], figures["versions"]
    up, dp, sa, sc = (
        figures["upload"],
        figures["dp_step"],
        figures["secagg_round"],
        figures["scaling"],
    )
    lines = [
        "## Systems: bytes, DP-SGD, SecAgg+, scaling, aggregation (`bench/systems.py`)",
        "",
        f"*Written by `{figures['command']}` on {figures['date']}; rerun it to "
        "regenerate this section, do not edit it by hand.*",
        "",
        f"- **Command** (repository root, the project's venv): `{figures['command']}`"
        f" ({figures['wall_seconds'] / 60:.1f} min)",
        f"- **Machine**: {describe_machine(m)}; load average {m['load_average']} at "
        f"the start, {figures['load_average_end']} at the end (shared with other "
        "work: wall-clock ratios are good to about ±30 %).",
        f"- **Versions**: Python {v['python']}, torch {v['torch']}, flwr {v['flwr']}, "
        f"opacus {v['opacus']}, peft {v['peft']}, transformers {v['transformers']}.",
        "",
        "### Goals",
        "",
        "| goal | measured | |",
        "|---|---|---|",
    ]
    lines += [f"| {g} | {m_} | {_verdict(ok)} |" for g, m_, ok in verdicts(figures)]
    lines += [
        "",
        "### Upload per site per round vs adapter vs full model",
        "",
        "wardround's round loop and the sites' real ClientApps on an in-process grid "
        "(every message in Flower's wire encoding); default model with DP-SGD, 3 "
        "sites, 2 rounds; base size: ViT-Base and BERT-Base encoders from their "
        "standard configs (random weights), `hidden-size = 256`, 3 sites, 1 round, no "
        "DP. *Full model* is the base model's float32 bytes.",
        "",
        "| model | aggregation | upload B/site/round | adapter B (float32) | × adapter "
        "| full model B | adapter / full |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, model, aggregation in (
        ("default_plain", "default (tiny)", "plain"),
        ("default_secagg", "default (tiny)", "SecAgg+"),
        ("base_plain", "base size", "plain"),
        ("base_secagg", "base size", "SecAgg+"),
    ):
        if key not in up:
            continue
        r = up[key]
        lines.append(
            f"| {model} | {aggregation} | {r['upload_bytes_per_site_per_round']:,.0f} | "
            f"{r['adapter_payload_bytes']:,} | "
            f"{r['upload_bytes_per_site_per_round'] / r['adapter_payload_bytes']:.3f} | "
            f"{r['base_model_bytes']:,} | "
            f"{r['adapter_payload_bytes'] / r['base_model_bytes']:.2%} |"
        )
    hooks, plain = dp["results"]["hooks"], dp["results"]["plain"]
    lines += [
        "",
        "### DP-SGD step vs plain step",
        "",
        f"`bench/dp_step.py --modes hooks` (batch {dp['options']['batch_size']}, "
        f"{dp['options']['steps']} timed steps, each variant in a fresh subprocess; "
        "method in the section above):",
        "",
        "| step | median s | × plain | peak RSS MB | × plain | step's own +MB |",
        "|---|---:|---:|---:|---:|---:|",
        f"| plain | {plain['median_s']:.4f} | 1.00 | {plain['peak_mb']:.0f} | 1.00 | "
        f"{plain['increment_mb']:.0f} |",
        f"| DP-SGD (`hooks`) | {hooks['median_s']:.4f} | {hooks['time_ratio']:.2f} | "
        f"{hooks['peak_mb']:.0f} | {hooks['memory_ratio']:.2f} | "
        f"{hooks['increment_mb']:.0f} |",
        "",
        "### SecAgg+ round vs plain round",
        "",
        f"`bench/secagg_round.py` ({sa['sites']} sites, {sa['adapter_parameters']:,} "
        "parameters, the protocol alone, median of 3; method in the section above): "
        f"round time {sa['plain_round_seconds_sites_parallel']:.3f} s plain vs "
        f"{sa['secagg_round_seconds_sites_parallel']:.3f} s SecAgg+ with the sites in "
        f"parallel ({sa['time_ratio_sites_parallel']:.2f}×), upload per site "
        f"{sa['plain_upload_bytes_per_site']:,.0f} B vs "
        f"{sa['secagg_upload_bytes_per_site']:,.0f} B ({sa['upload_ratio']:.2f}×). "
        "In whole rounds with the default model (above): upload "
        f"{up['default_secagg']['upload_bytes_per_site_per_round'] / up['default_plain']['upload_bytes_per_site_per_round']:.3f}×.",
        "",
        "### Simulation scaling and server aggregation",
        "",
        f"The same {figures['options']['total_patients']} synthetic patients split "
        "over 2, 4, 8 and 16 sites; `wardround simulate --sites N` with the default "
        f"config (DP-SGD ε = 8, 2 local epochs), {figures['options']['rounds']} "
        "rounds, every count in the clear (`--no-secagg`: SecAgg+ needs 3 sites, so "
        "only the same aggregation at every count isolates what each site costs; "
        "SecAgg+'s own cost is the line under the table and item 3). *Round* times are "
        "from `rounds.jsonl` (round 1 also plans the noise multiplier: the first "
        "site searches, the others read its answer from the machine's cache, "
        "emptied before each site count); *wall* "
        "the whole command (Ray start, synthetic data, every round); *sites' "
        "training* the local training time of the round's sites, summed (as their "
        "ClientApps time it; two sites train at once on the 2 cores; under SecAgg+ "
        "a site keeps it home, shown as –); *peak* the "
        "command's process tree (PSS, sampled every 0.5 s); *aggregation* the "
        "coordinator's unmasking and averaging per round.",
        "",
        "| sites | patients/site | round 1 s | rounds 2+ s | mean round s | × 2 sites "
        "| sites' training s/round | wall s | × 2 sites | peak MiB "
        "| aggregation s/round | aggregation / round | final AUROC |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = sc[min(sc, key=int)] if sc else None
    for sites, r in sorted(sc.items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {sites} | {r['patients_per_site']} | {r['round_seconds'][0]:.1f} | "
            f"{_later(r['round_seconds'])} | {r['mean_round_seconds']:.1f} | "
            f"{r['mean_round_seconds'] / first['mean_round_seconds']:.2f} | "
            f"{_seconds(r.get('mean_site_training_seconds'))} | "
            f"{r['wall_seconds']:.0f} | {r['wall_seconds'] / first['wall_seconds']:.2f} | "
            f"{r['peak_pss_mib']:.0f} | {r['mean_aggregation_seconds']:.3f} | "
            f"{r['mean_aggregation_seconds'] / r['mean_round_seconds']:.1%} | "
            f"{r['final_auroc']:.3f} |"
        )
    for sites, r in sorted(figures.get("scaling_secagg", {}).items()):
        plain = sc.get(sites)
        times = f"{plain['mean_round_seconds']:.1f} s in the clear: " if plain else ""
        ratio = r["mean_round_seconds"] / plain["mean_round_seconds"] if plain else None
        lines += [
            "",
            f"With SecAgg+ at {sites} sites: round 1 {r['round_seconds'][0]:.1f} s, "
            f"rounds 2+ {_later(r['round_seconds'])} s, mean round "
            f"{r['mean_round_seconds']:.1f} s ({times}"
            + (f"{ratio:.2f}×" if ratio is not None else "–")
            + f"), wall {r['wall_seconds']:.0f} s, final AUROC {r['final_auroc']:.3f}.",
        ]
    if plot is not None:
        link = Path(os.path.relpath(plot, docs_dir)).as_posix()
        lines += [
            "",
            f"![Round time and peak memory against the number of sites]({link})",
        ]
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    """A table cell: seconds to 0.1, or a dash where the sites did not say."""
    return "–" if value is None else f"{value:.1f}"


def plot_scaling(scaling: dict[str, Any], path: Path) -> Path:
    """Round time, wall time and peak memory against the site count (small PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted(scaling, key=int)
    xs = [int(s) for s in sites]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    left.plot(
        xs, [scaling[s]["mean_round_seconds"] for s in sites], "o-", label="round"
    )
    left.plot(
        xs,
        [scaling[s]["mean_aggregation_seconds"] for s in sites],
        "s--",
        label="server aggregation",
    )
    if all("mean_site_training_seconds" in scaling[s] for s in sites):
        left.plot(
            xs,
            [scaling[s]["mean_site_training_seconds"] for s in sites],
            "^:",
            label="sites' training (summed)",
        )
    left.set_ylabel("seconds per round")
    left.set_ylim(bottom=0)
    peaks = [scaling[s]["peak_pss_mib"] for s in sites]
    right.plot(xs, peaks, "o-", color="tab:red")
    right.set_ylim(0, max(peaks) * 1.15)
    right.set_ylabel("peak memory (MiB, PSS)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("sites (same total patients)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement, print the goals, optionally rewrite the docs section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: checks the script, not figures",
    )
    parser.add_argument("--sites", default="2,4,8,16", help="scaling site counts")
    parser.add_argument("--total-patients", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-base-size", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--from-json",
        type=Path,
        help="measure nothing: rewrite the docs section from a previous --json file",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        figures = json.loads(args.from_json.read_text())
        write_docs(figures, args.docs)
        return figures

    import torch

    from wardround.flower_compat.flower_logging import quiet_flower
    from wardround.ops.env import apply_machine_hygiene
    from wardround.server.rundir import versions
    from wardround.simulations.reporting import machine_info

    quiet_flower()
    torch.set_num_threads(1)
    started, machine = time.time(), machine_info()
    counts = [int(x) for x in args.sites.split(",")]
    if args.quick:
        counts, args.total_patients, args.rounds = [2, 4], 80, 1
    figures: dict[str, Any] = {
        "command": "python bench/systems.py"
        + (" --quick" if args.quick else "")
        + (" --write-docs" if args.write_docs else ""),
        "machine": machine,
        "versions": versions(),
        "options": {"total_patients": args.total_patients, "rounds": args.rounds},
    }
    with tempfile.TemporaryDirectory(prefix="wr-systems-") as tmp:
        work = Path(tmp)
        apply_machine_hygiene(work / ".state")
        print("1. upload per site per round", flush=True)
        figures["upload"] = measure_upload(
            work, quick=args.quick, base_size=not args.skip_base_size
        )
        print("2. DP-SGD step vs plain step", flush=True)
        steps = ["--steps", "3", "--warmup", "1"] if args.quick else []
        figures["dp_step"] = run_script(
            "dp_step.py", ["--modes", "hooks", *steps], work
        )
        print("3. SecAgg+ round vs plain round", flush=True)
        secagg = (
            ["--params", "65536", "--repeats", "1"]
            if args.quick
            else ["--repeats", "3"]
        )
        figures["secagg_round"] = run_script("secagg_round.py", secagg, work)
        print("4./5. simulation scaling and aggregation", flush=True)
        figures["scaling"] = measure_scaling(
            work, counts, args.total_patients, args.rounds
        )
        if max(counts) >= 3:  # SecAgg+'s own growth, at the largest count
            figures["scaling_secagg"] = measure_scaling(
                work, [max(counts)], args.total_patients, args.rounds, secure=True
            )
    figures["wall_seconds"] = time.time() - started
    figures["load_average_end"] = machine_info()["load_average"]
    figures["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    print()
    for goal, measured, met in verdicts(figures):
        print(f"{goal}: {measured} — {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if args.write_docs:
        write_docs(figures, args.docs)
    return figures


def write_docs(figures: dict[str, Any], docs: Path) -> None:
    """Rewrite the ``bench:systems`` section of ``docs`` and its plot."""
    from wardround.simulations.reporting import write_marked_section

    docs = docs.resolve()
    plot = plot_scaling(
        figures["scaling"], docs.parent / "plots" / "systems-scaling.png"
    )
    write_marked_section(docs, DOCS_SECTION, render(figures, plot, docs.parent))
    print(f"wrote the {DOCS_SECTION} section of {docs}")


if __name__ == "__main__":
    main()
