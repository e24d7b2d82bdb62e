"""The ``wardround site`` command group: ``check``, ``deid`` and ``privacy``.

Registered by ``wardround/cli.py`` with ``app.add_typer(site_app, name="site")``.
Heavy imports (pyarrow, pydicom, torch) happen inside the commands, so ``--help``
stays fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from wardround.cli_support import (
    JsonOption,
    SiteConfigOption,
    cli_flags,
    command_group,
    user_errors,
)

from ..ops.config_file import load_run_config

site_app = command_group(
    "site",
    help="Check a site's data and settings; export de-identified copies.",
)


CHECK_LOG = "site-check.log"


def _check_log_path(site_toml: Path) -> Path | None:
    """``<cache-dir>/site-check.log`` of a site with imaging (None: nothing to log)."""
    from wardround.common.errors import WardroundError

    from ..sitedata.site_config import SiteConfig

    try:
        site = SiteConfig.from_toml(site_toml)
        return site.cache_path / CHECK_LOG if site.has_imaging else None
    except WardroundError:
        return None  # the check reports why


@site_app.command("check")
@user_errors
def check(
    config: SiteConfigOption,
    run_config: Annotated[
        Path | None, typer.Option("--run-config", help="run.toml (default: defaults)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Validate a site's data; exit 0 when it can train, 3 listing what blocks it.

    A site.toml that cannot be read or validated exits 2, as every command does.
    """
    from wardround.common.config import RunConfig

    from .site_check import check_site, format_report

    run = load_run_config(run_config) if run_config else RunConfig()
    from ..sitedata.dicom_warnings import log_to_file

    log_path = _check_log_path(config)
    with log_to_file(log_path):
        report = check_site(
            config,
            run.task,
            image_size=run.model.image_size,
            images_required=run.requires_images if run_config else None,
            run=run if run_config else None,
        )
    if log_path is not None:
        report["log"] = str(log_path)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["can_train"]:
        from wardround.common.errors import DataError

        raise typer.Exit(report.get("exit_code", DataError.exit_code))


@site_app.command("deid")
@user_errors
def deid(
    src: Annotated[Path, typer.Option("--in", help="DICOM folder to copy")],
    out: Annotated[
        Path, typer.Option("--out", help="folder for the de-identified copy")
    ],
    salt: Annotated[
        str | None, typer.Option("--salt", help="secret pseudonym salt")
    ] = None,
    salt_file: Annotated[
        Path | None, typer.Option("--salt-file", help="file holding the salt")
    ] = None,
    ehr: Annotated[
        Path | None, typer.Option("--ehr", help="EHR Parquet to map")
    ] = None,
    ehr_out: Annotated[
        Path | None, typer.Option("--ehr-out", help="where the mapped EHR goes")
    ] = None,
    study_col: Annotated[str, typer.Option("--study-col")] = "study_uid",
    patient_col: Annotated[str, typer.Option("--patient-col")] = "patient_id",
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="per-file account (JSON Lines; names source files, so it stays "
            "outside --out); default: OUT.deid-report.jsonl beside --out",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Export a de-identified copy (DICOM PS3.15 Basic Profile, salted UID pseudonyms).

    Every input file is reported as written, a duplicate of another file of the
    same SOPInstanceUID (one copy per instance is written), or failed with why.
    """
    from wardround.common.errors import ConfigError, DataError

    from .deid import deid_ehr, load_salt
    from .deid_export import deid_folder

    if (ehr is None) != (ehr_out is None):
        raise ConfigError("--ehr and --ehr-out go together")
    key = load_salt(salt, salt_file)
    result = deid_folder(src, out, key, report=report)
    if ehr is not None and ehr_out is not None:
        ehr_result = deid_ehr(
            ehr, ehr_out, key, study_column=study_col, patient_column=patient_col
        )
        result.ehr_rows = ehr_result.rows
        result.ehr_missing_ids = ehr_result.missing_ids
    if as_json:
        typer.echo(json.dumps(result.summary(), indent=2))
    else:
        _print_deid(result, out, ehr_out)
    if result.unlisted_folders:
        shown = ", ".join(result.unlisted_folders[:5])
        more = len(result.unlisted_folders) - 5
        typer.echo(
            f"NOT SEEN: {len(result.unlisted_folders)} folder(s) under {src} the "
            f"account running wardround may not list ({shown}"
            f"{f', and {more} more' if more > 0 else ''}): their files are not in the "
            "counts. Give that account read access and run it again.",
            err=True,
        )
        raise typer.Exit(DataError.exit_code)


def _print_deid(result: Any, out: Path, ehr_out: Path | None) -> None:
    n_failed = sum(result.failed.values())
    typer.echo(
        f"{result.files} input file(s): {result.written} de-identified into {out}, "
        f"{result.duplicates} duplicate(s) of a written instance, {n_failed} failed"
    )
    if result.duplicates:
        typer.echo(
            "  duplicates share a SOPInstanceUID with a written file (a re-send, a "
            "copy in another transfer syntax): one copy per instance is written"
        )
    for reason, n in result.failed.items():
        typer.echo(f"  failed {n}: {reason}")
    if result.pydicom_warnings:
        total = sum(result.pydicom_warnings.values())
        typer.echo(f"pydicom warned {total} time(s), by kind:")
        for kind, n in result.pydicom_warnings.items():
            typer.echo(f"  {n}: {kind}")
    if result.burned_in or result.burn_in_undeclared:
        typer.echo(
            f"review for burned-in text: {result.burned_in} declared, "
            f"{result.burn_in_undeclared} undeclared in prone modalities (the "
            "report's burned_in field names them)"
        )
    if ehr_out is not None:
        typer.echo(f"EHR: {result.ehr_rows} row(s) written to {ehr_out}")
        for column, n in result.ehr_missing_ids.items():
            if n:
                typer.echo(f"  {n} row(s) with no {column} (null or blank): left null")
    typer.echo(f"every file's outcome (and warnings): {result.report}")


@site_app.command("privacy")
@user_errors
def privacy(
    config: SiteConfigOption,
    delta: Annotated[float, typer.Option(help="delta to report epsilon at")] = 1e-5,
    as_json: JsonOption = False,
) -> None:
    """The site's privacy ledger: epsilon spent per run and over every run."""
    from ..sitedata.site_config import SiteConfig
    from .dashboard.state import privacy_report

    report = privacy_report(SiteConfig.from_toml(config), delta)
    rounds = report["rounds"]
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if not rounds and not report["earlier_ledgers"]:
        typer.echo(f"nothing spent yet: {report['ledger']} records no round")
        return
    typer.echo(
        f"epsilon {report['epsilon_total']:.3f} of {report['budget_epsilon']:g} spent "
        f"(RDP, delta {delta:g}) over {rounds} round(s) in {report['ledger']}"
    )
    for path in report["earlier_ledgers"]:
        typer.echo(f"  counted too: {path} (a per-model ledger of an earlier version)")
    for run, eps in report["runs"].items():
        typer.echo(f"  run {run}: epsilon {eps:.3f}")


@site_app.command("start")
@user_errors
def start(
    config: SiteConfigOption,
) -> None:
    """Run the site daemon (a Flower SuperNode and the warm worker) until SIGTERM."""
    import logging
    import signal
    import threading

    from ..flower_compat.flower_logging import flower_lines_once, quiet_flower
    from ..sitedata.dicom_warnings import log_to_file
    from .daemon import SUPERNODE_LOG, plan_site, run_site_daemon

    flower_lines_once()
    if not cli_flags["verbose"]:
        # Flower's logger hands even its DEBUG lines (SecAgg+ stages, retries of
        # the worker) to the daemon's handler. The SuperNode is a child process
        # that writes its own log file, read at INFO by the daemon: untouched.
        quiet_flower(logging.WARNING)
    with log_to_file(_check_log_path(config)):
        plan = plan_site(config)
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    name = plan.site.site.name

    def announce() -> None:  # once the state folder is this daemon's
        typer.echo(
            f"site {name}: connecting to {plan.coordinator} (TLS); "
            f"state in {plan.state_dir}; the connection's log (retries, refusals): "
            f"{plan.state_dir / SUPERNODE_LOG}"
        )
        if plan.site.dashboard.enabled:
            from .dashboard.app import site_exposure

            url = site_exposure(plan.site, plan.site_toml).url
            typer.echo(f"site {name}: dashboard and /metrics on {url}")

    run_site_daemon(
        plan,
        stop,
        report=lambda message: typer.echo(f"site {name}: {message}"),
        on_locked=announce,
    )
    typer.echo(f"site {name}: stopped")


@site_app.command("approve")
@user_errors
def approve(
    config: SiteConfigOption,
    app_hash: Annotated[
        str | None,
        typer.Argument(
            help="the app hash `wardround launch` shows (or give --run-config)",
            show_default=False,
        ),
    ] = None,
    run_config: Annotated[
        Path | None,
        typer.Option(
            "--run-config",
            help="the run.toml to approve: its app hash is computed as `wardround "
            "launch --print-hash` does, and its settings are shown",
            dir_okay=False,
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="approve the shown run without asking")
    ] = False,
    note: Annotated[str, typer.Option(help="why, for the audit log")] = "",
    revoke: Annotated[
        bool, typer.Option("--revoke", help="withdraw an approval instead")
    ] = False,
) -> None:
    """Allow (or, with --revoke, stop allowing) runs of one app to train at this site.

    With --run-config the site sees what it approves: the hash is recomputed from
    run.toml and the run's privacy, secure-aggregation, federation, model and task
    settings are shown before it asks. A bare HASH cannot be shown.
    """
    from wardround.ops.audit import AuditLog, safe_reason

    from ..sitedata.site_config import SiteConfig
    from .approvals import AppApprovals, describe_run
    from .daemon import AUDIT_FILE

    site = SiteConfig.from_toml(config)
    value, settings = _app_to_approve(app_hash, run_config)
    approvals = AppApprovals(site.state_path)
    audit = AuditLog(site.state_path / AUDIT_FILE, actor=f"site:{site.site.name}")
    if revoke:
        found = approvals.revoke(value)
        audit.record("app_refused", fab_hash=value, reason="approval withdrawn")
        typer.echo("approval withdrawn" if found else "that app was not approved")
        return
    if settings is None:
        typer.echo(
            "warning: approving a bare hash: wardround cannot show what it "
            "approves. `--run-config run.toml` recomputes the hash and shows the "
            "run's settings.",
            err=True,
        )
    elif not _shown_and_confirmed(site, value, run_config, settings, yes):
        typer.echo("not approved")
        raise typer.Exit(1)
    approvals.approve(
        value,
        note=safe_reason(note),
        settings=describe_run(settings) if settings is not None else None,
    )
    audit.record(
        "app_approved",
        fab_hash=value,
        note=safe_reason(note),
        settings_shown=settings is not None,
    )
    typer.echo(f"approved app {value} at site {site.site.name}")


def _app_to_approve(app_hash: str | None, run_config: Path | None):  # noqa: ANN202
    """(app hash, the run's settings or None for a bare hash) named on the command line."""
    from wardround.common.errors import ConfigError

    from .approvals import normalize_hash

    if run_config is not None:
        value, settings = _run_hash_and_settings(run_config)
        if app_hash is not None and normalize_hash(app_hash) != value:
            raise ConfigError(
                f"{run_config} has app hash {value}, not the {app_hash} given",
                hint="Approve the run.toml you were sent; ask the coordinator "
                "admin which one they launched.",
            )
        return value, settings
    if app_hash is not None:
        return normalize_hash(app_hash), None
    raise ConfigError(
        "name the app to approve: a run.toml or its hash",
        hint="Run `wardround site approve --run-config run.toml --config site.toml`.",
    )


def _shown_and_confirmed(site, value: str, run_config, settings, yes: bool) -> bool:  # noqa: ANN001
    """Show the run's hash and settings (and whether this site can train in it); ask."""
    from .answers import AnswerKind, answer_limit
    from .approvals import approval_summary, describe_run, fitted

    width = max(shutil.get_terminal_size().columns - 1, 40)
    typer.echo(f"app hash {value} ({run_config})")
    typer.echo("\n".join(fitted(line, width) for line in describe_run(settings)))
    federation = settings.federation
    trainings, evaluations = (
        answer_limit(kind, federation.rounds, federation.repeatable_rounds)
        for kind in (AnswerKind.TRAIN, AnswerKind.EVALUATE)
    )
    typer.echo(
        f"this site answers this run at most {trainings} training and "
        f"{evaluations} evaluation message(s)"
        + (
            f", {federation.repeatable_rounds} of each spare for rounds asked again"
            if federation.repeatable_rounds
            else ""
        )
    )
    allowed = site.answers.max_repeatable_rounds
    if federation.repeatable_rounds > allowed:
        typer.echo(
            f"warning: the run has repeatable-rounds = {federation.repeatable_rounds} "
            f"and this site's [answers] max-repeatable-rounds = {allowed}: this site "
            "will refuse to answer it.",
            err=True,
        )
    if federation.repeatable_rounds and not settings.privacy.enabled:
        typer.echo(
            f"warning: repeatable-rounds = {federation.repeatable_rounds} without DP: "
            "each spare is one more un-noised update, on an adapter the coordinator "
            "chooses",
            err=True,
        )
    if settings.privacy.enabled and settings.train.batch_size:
        typer.echo(
            f"warning: train.batch-size = {settings.train.batch_size}: the sample "
            "rate every DP answer carries (q = 1/ceil(patients / batch)) then tells "
            "the coordinator this site's number of training patients to within one "
            "batch (the DP recipe's batch, 0, is a fixed share of them)",
            err=True,
        )
    if not site.has_imaging and settings.requires_images:
        from ..sitedata.imaging import no_imaging_error

        refusal = no_imaging_error(site)
        typer.echo(
            f"warning: {refusal.message}: this site will refuse to train "
            f"in it. {refusal.hint}",
            err=True,
        )
    from .privacy_policy import settings_below_floor

    for reason in settings_below_floor(settings, site.privacy):
        typer.echo(
            f"warning: {reason}: this site's [privacy] floor will refuse to train "
            "in it.",
            err=True,
        )
    typer.echo(approval_summary(settings, value))
    return yes or typer.confirm(
        f"Approve this run at site {site.site.name}?", default=False
    )


def _run_hash_and_settings(run_config: Path):  # noqa: ANN202 - (str, RunConfig)
    """The app hash of a run.toml, built the way `wardround launch` builds it."""
    import tempfile

    from wardround.flower_compat.app_bundle import build_app

    run = load_run_config(run_config)
    with tempfile.TemporaryDirectory(prefix="wardround-approve-") as apps:
        return build_app(run, Path(apps)).fab_hash, run


@site_app.command("approvals")
@user_errors
def approvals_list(
    config: SiteConfigOption,
) -> None:
    """The app hashes this site has approved."""
    from ..sitedata.site_config import SiteConfig
    from .approvals import AppApprovals

    site = SiteConfig.from_toml(config)
    approved = AppApprovals(site.state_path).load()
    if not approved:
        typer.echo("no app approved yet")
    for fab_hash, row in sorted(approved.items(), key=lambda kv: kv[1]["approved_at"]):
        note = f"  {row['note']}" if row.get("note") else ""
        typer.echo(f"{fab_hash}  {row['approved_at']}{note}")
