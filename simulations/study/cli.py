"""The ``wardround study`` command group: ``quality``.

Registered by ``wardround/cli.py`` with ``app.add_typer(study_app, name="study")``.
Heavy imports (torch, Flower) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer

study_app = typer.Typer(
    name="study",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Studies on synthetic hospitals: learning quality of federated training.",
)


def _fail(exc: Exception) -> None:
    from wardround.cli import _fail as fail  # late: wardround.cli imports this module

    fail(exc)


def _size(patients: int) -> str:
    return "own data" if patients == 0 else f"{patients} patients"


def _numbers(option: str, text: str | None, example: str) -> tuple[int, ...] | None:
    """A comma list of whole numbers (None: the option was not given)."""
    from wardround.common.errors import ConfigError

    if text is None:
        return None
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not a comma list of whole numbers",
            hint=f"For example {option} {example}.",
        ) from None
    return counts


def _site_counts(text: str | None) -> tuple[int, ...] | None:
    return _numbers("--sites", text, "3,8")


def _bases(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def run_workers(jobs: int, options: list[str]) -> None:
    """Run ``jobs`` worker processes of this command, each with a share of the work.

    They hand their results over in the output folder's arm files (JSON); every
    worker is stopped by PID if this process is interrupted.
    """
    import signal
    import subprocess
    import sys

    from wardround.cli import _raise_keyboard_interrupt

    # SIGTERM stops the workers too (the finally below), like Ctrl-C
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    # -P: the working directory must not shadow the installed package (a
    # checkout's top-level wardround/ folder holds only the CLI modules)
    command = [sys.executable, "-P", "-m", "wardround.cli", "study", "quality"]
    command += options
    workers = [
        subprocess.Popen([*command, "--shard", f"{index}/{jobs}"])
        for index in range(jobs)
    ]
    try:
        for index, worker in enumerate(workers):
            if worker.wait() != 0:
                logging.getLogger(__name__).warning(
                    "study worker %d/%d exited with %d; its unfinished arms run in "
                    "this process",
                    index,
                    jobs,
                    worker.returncode,
                )
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(timeout=30)


@study_app.command("quality")
def quality(
    sites: Annotated[
        str | None,
        typer.Option(
            help="Comma list of site counts (default: 3,8 for full, 3 for smoke)."
        ),
    ] = None,
    patients: Annotated[
        str | None,
        typer.Option(
            help="Comma list of patients per site (default: 200,1000,3000 for full, "
            "40 for smoke); the smallest runs every arm, the others the privacy axis."
        ),
    ] = None,
    bases: Annotated[
        str | None,
        typer.Option(
            help="Comma list of bases: pretrained, random, or a base folder (default: "
            "pretrained,random for full, random for smoke); the first that is not "
            "random runs the ablations."
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Seeds 0..N-1: one N for every size, or one per --patients size "
            "(default: 3,2,1 for full, 1 for smoke)."
        ),
    ] = None,
    size: Annotated[
        str,
        typer.Option(help="smoke (seconds, tests) or full (the published figures)."),
    ] = "full",
    sites_dir: Annotated[
        Path | None,
        typer.Option(
            help="Run on the site folders in this folder (each with its site.toml) "
            "instead of synthetic hospitals. Pooled arms gather every site's data on "
            "this machine: for a data-sharing sandbox or a simulation, never a "
            "deployment."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="With --sites-dir: the run config (task labels, EHR features, model) "
            "the arms start from."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default runs/study-quality-SIZE); rerunning resumes it."
        ),
    ] = None,
    write_docs: Annotated[
        bool,
        typer.Option(
            "--write-docs", help="Rewrite the study's section of --docs and its plots."
        ),
    ] = False,
    docs: Annotated[
        Path, typer.Option(help="The Markdown file --write-docs rewrites a section of.")
    ] = Path("docs/benchmarks.md"),
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes, each running whole federations (one per core).",
        ),
    ] = 1,
    shard: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Federated vs pooled vs local-only; DP, SecAgg+, modalities; per base and size."""
    try:
        from rich.console import Console

        from wardround.common.config import RunConfig  # noqa: F401  (fail early)
        from wardround.common.env import apply_machine_hygiene
        from wardround.common.errors import ConfigError

        from ..reporting import machine_info
        from .plan import StudySettings, StudySize
        from .runner import run_study
        from .runner import write_docs as publish
        from .stats import site_mean

        try:
            study_size = StudySize(size)
        except ValueError:
            raise ConfigError(
                f"--size {size!r} is not a study size", hint="Use smoke or full."
            ) from None
        if sites_dir is not None:
            if sites or patients:
                raise ConfigError(
                    "--sites and --patients describe synthetic hospitals; "
                    "--sites-dir runs on the sites it holds",
                    hint="Leave --sites and --patients out with --sites-dir.",
                )
            seed_counts = _numbers("--seeds", seeds, "3") or (1,)
            if len(seed_counts) != 1:
                raise ConfigError(
                    "--seeds takes one count with --sites-dir", hint="E.g. --seeds 3."
                )
            settings = StudySettings.for_sites_dir(
                study_size,
                sites_dir,
                seeds=seed_counts[0],
                bases=_bases(bases),
                run_config=config,
            )
        elif config is not None:
            raise ConfigError(
                "--config only applies with --sites-dir",
                hint="The synthetic hospitals use the default task.",
            )
        else:
            settings = StudySettings.for_size(
                study_size,
                site_counts=_site_counts(sites),
                seeds=_numbers("--seeds", seeds, "3,2,1"),
                patients=_numbers("--patients", patients, "200,1000,3000"),
                bases=_bases(bases),
            )
        out_dir = out or Path(f"runs/study-quality-{study_size.value}")
        command = "wardround study quality" + "".join(
            [
                f" --size {study_size.value}",
                f" --sites {sites}" if sites else "",
                f" --sites-dir {sites_dir}" if sites_dir else "",
                f" --config {config}" if config else "",
                f" --patients {patients}" if patients else "",
                f" --bases {bases}" if bases else "",
                f" --seeds {seeds}" if seeds else "",
                f" --out {out}" if out else "",
                f" --jobs {jobs}" if jobs > 1 else "",
                " --write-docs" if write_docs else "",
                f" --docs {docs}"
                if write_docs and docs != Path("docs/benchmarks.md")
                else "",
            ]
        )
        console = Console()
        started, machine = time.time(), machine_info()
        apply_machine_hygiene(out_dir / ".state")
        # Flower logs every sampling and SecAgg+ stage; the study prints per arm.
        from ...flower_compat.flower_logging import quiet_flower

        quiet_flower()

        def on_arm(event) -> None:
            if event.cached and jobs > 1:
                return  # the workers said it when they ran it
            state = (
                f"failed: {event.error}"
                if event.error
                else f"AUROC {site_mean(event.outcome.final):.3f} "
                f"({'cached' if event.cached else f'{event.outcome.seconds:.0f} s'})"
            )
            console.print(
                f"[{event.index}/{event.total}] {event.cell.label}, seed "
                f"{event.seed}, {event.arm.label}: {state}",
                highlight=False,
            )

        console.print(
            f"{command}: {len(settings.cells())} cells, arm runs per size: "
            + ", ".join(
                f"{'own data' if p == 0 else f'{p} patients'} {settings.arm_count(p)}"
                for p in settings.patients
            )
            + f" → {out_dir}",
            highlight=False,
        )
        if shard is not None:
            index, count = (int(x) for x in shard.split("/"))
            run_study(
                settings, out_dir, command=command, on_arm=on_arm, shard=(index, count)
            )
            return
        if jobs > 1:
            run_workers(
                jobs,
                [
                    "--size",
                    study_size.value,
                    *(["--sites", sites] if sites else []),
                    *(["--sites-dir", str(sites_dir)] if sites_dir else []),
                    *(["--config", str(config)] if config else []),
                    *(["--patients", patients] if patients else []),
                    *(["--bases", bases] if bases else []),
                    *(["--seeds", seeds] if seeds else []),
                    "--out",
                    str(out_dir),
                ],
            )
        result = run_study(
            settings,
            out_dir,
            command=command,
            on_arm=on_arm,
            started=started,
            machine=machine,
        )
        for goal in result.data["goals"]:
            verdict = {True: "met", False: "MISSED", None: "reported"}[goal["met"]]
            if goal["met"] is None and goal["value"] is None:  # NaN in study.json
                verdict = "not measured"
            console.print(
                f"  {_size(goal['patients'])} × {goal['sites']} sites, "
                f"{goal['base']}: {goal['goal']}: {goal['measured']} — {verdict}",
                highlight=False,
            )
        console.print(f"study.json, report.md, plots/ in {result.out_dir}")
        if write_docs:
            publish(result, docs)
            console.print(f"wrote the study's section of {docs}")
        if result.failed:
            from wardround.common.errors import FederationError

            raise FederationError(
                f"{len(result.failed)} arm run(s) failed: {', '.join(result.failed)}",
                hint="report.md lists why; rerun the command to retry only those.",
            )
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes in _fail
        _fail(exc)
