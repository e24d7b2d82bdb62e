"""The ``wardround study`` command group: ``quality``.

Registered by ``wardround/cli.py`` with ``app.add_typer(study_app, name="study")``.
Heavy imports (torch, Flower) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from .plan import StudySettings
    from .runner import ArmEvent, StudyResult

from wardround.cli_support import command_group, user_errors

study_app = command_group(
    "study",
    help="Studies on synthetic hospitals: learning quality of federated training.",
)


def _size(patients: int) -> str:
    return "own data" if patients == 0 else f"{patients} patients"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
    import subprocess
    import sys

    from wardround.cli_support import interrupt_on_sigterm

    # SIGTERM stops the workers too (the finally below), like Ctrl-C
    interrupt_on_sigterm()

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


SitesOption = Annotated[
    str | None,
    typer.Option(
        "--sites",
        help="Comma list of site counts (default: 3,8 for full, 3 for smoke).",
    ),
]
PatientsOption = Annotated[
    str | None,
    typer.Option(
        "--patients",
        help="Comma list of patients per site (default: 200,1000,3000 for full, "
        "40 for smoke); the smallest runs every arm, the others the privacy axis "
        "and the personalised arms.",
    ),
]
BasesOption = Annotated[
    str | None,
    typer.Option(
        "--bases",
        help="Comma list of bases: pretrained, random, or a base folder (default: "
        "pretrained,random for full, random for smoke); the first that is not "
        "random runs the ablations.",
    ),
]
SeedsOption = Annotated[
    str | None,
    typer.Option(
        "--seeds",
        help="Seeds 0..N-1: one N for every size, or one per --patients size "
        "(default: 3,2,1 for full, 1 for smoke).",
    ),
]
SizeOption = Annotated[
    str,
    typer.Option(
        "--size", help="smoke (seconds, tests) or full (the published figures)."
    ),
]
SitesDirOption = Annotated[
    Path | None,
    typer.Option(
        "--sites-dir",
        help="Run on the site folders in this folder (each with its site.toml) "
        "instead of synthetic hospitals. Pooled arms gather every site's data on "
        "this machine: for a data-sharing sandbox or a simulation, never a "
        "deployment.",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="With --sites-dir: the run config (task labels, EHR features, model) "
        "the arms start from.",
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Output folder (default runs/study-quality-SIZE); rerunning resumes it.",
    ),
]
WriteDocsOption = Annotated[
    bool,
    typer.Option(
        "--write-docs", help="Rewrite the study's section of --docs and its plots."
    ),
]
DocsOption = Annotated[
    Path,
    typer.Option(
        "--docs", help="The Markdown file --write-docs rewrites a section of."
    ),
]
JobsOption = Annotated[
    int,
    typer.Option(
        "--jobs",
        min=1,
        max=64,
        help="Worker processes, each running whole federations (one per core).",
    ),
]
DEFAULT_DOCS = Path("docs/benchmarks.md")


@dataclass(frozen=True)
class QualityOptions:
    """``study quality``'s options as given (None: not given)."""

    size: str
    sites: str | None
    patients: str | None
    bases: str | None
    seeds: str | None
    sites_dir: Path | None
    config: Path | None
    out: Path | None
    write_docs: bool
    docs: Path
    jobs: int

    def command_line(self, size: str) -> str:
        """The command as the user could type it again (the report quotes it)."""
        return "wardround study quality" + "".join(
            [
                f" --size {size}",
                f" --sites {self.sites}" if self.sites else "",
                f" --sites-dir {self.sites_dir}" if self.sites_dir else "",
                f" --config {self.config}" if self.config else "",
                f" --patients {self.patients}" if self.patients else "",
                f" --bases {self.bases}" if self.bases else "",
                f" --seeds {self.seeds}" if self.seeds else "",
                f" --out {self.out}" if self.out else "",
                f" --jobs {self.jobs}" if self.jobs > 1 else "",
                " --write-docs" if self.write_docs else "",
                f" --docs {self.docs}"
                if self.write_docs and self.docs != DEFAULT_DOCS
                else "",
            ]
        )

    def worker_options(self, size: str, out_dir: Path) -> list[str]:
        """What each ``--jobs`` worker is given: the same study, into ``out_dir``."""
        return [
            "--size",
            size,
            *(["--sites", self.sites] if self.sites else []),
            *(["--sites-dir", str(self.sites_dir)] if self.sites_dir else []),
            *(["--config", str(self.config)] if self.config else []),
            *(["--patients", self.patients] if self.patients else []),
            *(["--bases", self.bases] if self.bases else []),
            *(["--seeds", self.seeds] if self.seeds else []),
            "--out",
            str(out_dir),
        ]


@study_app.command("quality")
@user_errors
def quality(
    sites: SitesOption = None,
    patients: PatientsOption = None,
    bases: BasesOption = None,
    seeds: SeedsOption = None,
    size: SizeOption = "full",
    sites_dir: SitesDirOption = None,
    config: ConfigOption = None,
    out: OutOption = None,
    write_docs: WriteDocsOption = False,
    docs: DocsOption = DEFAULT_DOCS,
    jobs: JobsOption = 1,
    shard: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Federated vs pooled vs local-only; DP, SecAgg+, modalities; per base and size."""
    options = QualityOptions(
        size,
        sites,
        patients,
        bases,
        seeds,
        sites_dir,
        config,
        out,
        write_docs,
        docs,
        jobs,
    )
    run_quality(options, shard)


def run_quality(options: QualityOptions, shard: str | None = None) -> None:
    """Run the study ``options`` describe (one ``--jobs`` worker's share: ``shard``)."""
    from rich.console import Console

    from wardround.common.config import RunConfig  # noqa: F401  (fail early)
    from wardround.ops.env import apply_machine_hygiene

    from ..reporting import machine_info
    from .runner import run_study

    settings = study_settings(options)
    size = settings.size.value
    out_dir = options.out or Path(f"runs/study-quality-{size}")
    command = options.command_line(size)
    console = Console()
    started, machine = time.time(), machine_info()
    apply_machine_hygiene(out_dir / ".state")
    # Flower logs every sampling and SecAgg+ stage; the study prints per arm.
    from ...flower_compat.flower_logging import quiet_flower

    quiet_flower()
    on_arm = _arm_printer(console, options.jobs)
    console.print(
        f"{command}: {_count(len(settings.cells()), 'cell')}, arm runs per size: "
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
    if options.jobs > 1:
        run_workers(options.jobs, options.worker_options(size, out_dir))
    result = run_study(
        settings,
        out_dir,
        command=command,
        on_arm=on_arm,
        started=started,
        machine=machine,
    )
    _report(console, result, options)


def study_settings(options: QualityOptions) -> StudySettings:
    """The study's settings from the options; ConfigError for a bad combination."""
    from wardround.common.errors import ConfigError

    from .plan import StudySettings, StudySize

    try:
        study_size = StudySize(options.size)
    except ValueError:
        raise ConfigError(
            f"--size {options.size!r} is not a study size", hint="Use smoke or full."
        ) from None
    if options.sites_dir is not None:
        if options.sites or options.patients:
            raise ConfigError(
                "--sites and --patients describe synthetic hospitals; "
                "--sites-dir runs on the sites it holds",
                hint="Leave --sites and --patients out with --sites-dir.",
            )
        seed_counts = _numbers("--seeds", options.seeds, "3") or (1,)
        if len(seed_counts) != 1:
            raise ConfigError(
                "--seeds takes one count with --sites-dir", hint="E.g. --seeds 3."
            )
        return StudySettings.for_sites_dir(
            study_size,
            options.sites_dir,
            seeds=seed_counts[0],
            bases=_bases(options.bases),
            run_config=options.config,
        )
    if options.config is not None:
        raise ConfigError(
            "--config only applies with --sites-dir",
            hint="The synthetic hospitals use the default task.",
        )
    return StudySettings.for_size(
        study_size,
        site_counts=_site_counts(options.sites),
        seeds=_numbers("--seeds", options.seeds, "3,2,1"),
        patients=_numbers("--patients", options.patients, "200,1000,3000"),
        bases=_bases(options.bases),
    )


def _arm_printer(console: Console, jobs: int) -> Callable[[ArmEvent], None]:
    """A line per arm as it finishes (workers print their own arms)."""
    from .stats import site_mean

    def on_arm(event: ArmEvent) -> None:
        if event.cached and jobs > 1:
            return  # the workers said it when they ran it
        outcome = event.outcome
        if outcome is not None:
            scored = {s: v for s, v in outcome.final.items() if s not in event.unscored}
            left_out = (
                f"{', '.join(event.unscored)} not scored: none of the arm's inputs; "
                if event.unscored
                else ""
            )
            state = (
                f"AUROC {site_mean(scored):.3f} ({left_out}"
                f"{'cached' if event.cached else f'{outcome.seconds:.0f} s'})"
            )
        else:
            state = f"failed: {event.error}"
        console.print(
            f"[{event.index}/{event.total}] {event.cell.label}, seed "
            f"{event.seed}, {event.arm.label}: {state}",
            highlight=False,
        )

    return on_arm


def _report(console: Console, result: StudyResult, options: QualityOptions) -> None:
    """Print the goals, publish to the docs if asked; fail if an arm failed."""
    from .runner import write_docs as publish

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
    if options.write_docs:
        publish(result, options.docs)
        console.print(f"wrote the study's section of {options.docs}")
    if result.failed:
        from wardround.common.errors import FederationError

        raise FederationError(
            f"{len(result.failed)} arm run(s) failed: {', '.join(result.failed)}",
            hint="report.md lists why; rerun the command to retry only those.",
        )
