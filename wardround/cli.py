"""The ``wardround`` command line: one entry point for all three kinds of user.

User errors (``WardroundError``) are shown as one paragraph with what to fix and
a non-zero exit code; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from wardround.server.federation import RoundObserver

from wardround.cli_support import (
    RunConfigOption,
    cli_flags,
    command_group,
    err_console,
    interrupt_on_sigterm,
    sigterm_received,
    user_errors,
)

app = command_group(
    "wardround",
    help="Federated LoRA fine-tuning of multimodal medical models across hospitals.",
)
console = Console()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")
    ] = False,
) -> None:
    cli_flags["debug"] = debug
    cli_flags["verbose"] = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


SitesOption = Annotated[
    int | None,
    typer.Option(min=1, max=256, help="Synthetic sites to make (default 3)."),
]
PatientsOption = Annotated[
    int | None,
    typer.Option(
        min=10,
        max=1_000_000,
        help="Patients per synthetic site (default: the config's, 300).",
    ),
]
RoundsOption = Annotated[
    int | None, typer.Option(min=1, help="Rounds (default: the config's, 5).")
]
StrategyOption = Annotated[
    str | None, typer.Option(help="fedavg or fedprox (overrides the config).")
]
ProximalMuOption = Annotated[
    float | None, typer.Option("--proximal-mu", help="FedProx's mu.")
]
ModalitiesOption = Annotated[
    str | None, typer.Option(help="Comma list of image,ehr,note (ablations).")
]
FusionOption = Annotated[
    str | None, typer.Option(help="concat, gated or cross-attention.")
]
DpOption = Annotated[
    bool | None,
    typer.Option(
        "--dp/--no-dp", help="DP-SGD at every site (default: on, from the config)."
    ),
]
EpsilonOption = Annotated[
    float | None,
    typer.Option(help="Target epsilon of the run at each site (default 8)."),
]
SecaggOption = Annotated[
    bool | None,
    typer.Option(
        "--secagg/--no-secagg",
        help="Flower SecAgg+ (default: on); --no-secagg aggregates in the clear "
        "(debugging).",
    ),
]
TransportDtypeOption = Annotated[
    str | None,
    typer.Option(
        "--transport-dtype",
        help="How a plain round's delta travels: float32 (default), float16 or "
        "bfloat16 (half the bytes; needs --no-secagg).",
    ),
]
LoraVariantOption = Annotated[
    str | None,
    typer.Option(help="lora (A and B train) or ffa (FFA-LoRA: B only)."),
]


@app.command()
@user_errors
def simulate(
    sites: SitesOption = None,
    patients: PatientsOption = None,
    rounds: RoundsOption = None,
    config: RunConfigOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="The run directory to write (default: the config's output.dir "
            "where it sets one, else runs/simulate)."
        ),
    ] = None,
    strategy: StrategyOption = None,
    proximal_mu: ProximalMuOption = None,
    modalities: ModalitiesOption = None,
    fusion: FusionOption = None,
    dp: DpOption = None,
    epsilon: EpsilonOption = None,
    secure_aggregation: SecaggOption = None,
    lora_variant: LoraVariantOption = None,
    transport_dtype: TransportDtypeOption = None,
) -> None:
    """Run a whole federation on this machine (synthetic hospitals unless given data)."""
    given = {
        flag
        for flag, value in {
            "--patients": patients,
            "--rounds": rounds,
            "--strategy": strategy,
            "--proximal-mu": proximal_mu,
            "--transport-dtype": transport_dtype,
            "--modalities": modalities,
            "--fusion": fusion,
            "--lora-variant": lora_variant,
            "--epsilon": epsilon,
        }.items()
        if value is not None
    }
    try:
        run_config = _load_run_config(config)
        with _flags_named(given):  # the file's own values are named by its keys
            if patients is not None:
                run_config = _with_synthetic_patients(run_config, patients)
            run_config = _with_overrides(
                run_config,
                federation={
                    "rounds": rounds,  # checked here, before any data is written
                    "strategy": strategy,
                    "proximal_mu": proximal_mu,
                    "transport_dtype": transport_dtype,
                },
                model={
                    "modalities": _comma_list(modalities),
                    "fusion": fusion,
                    "lora_variant": lora_variant,
                },
                privacy={"enabled": dp, "target_epsilon": epsilon},
                secure_aggregation={"enabled": secure_aggregation},
            )
            _run_simulation(run_config, _simulation_out(out, run_config), sites, rounds)
    except (KeyboardInterrupt, SystemExit) as stop:
        _exit_interrupted(stop)


# The run-config key each simulate option sets, for messages about its value.
FLAG_KEYS = {
    "--patients": "data.patients-per-site",
    "--rounds": "federation.rounds",
    "--strategy": "federation.strategy",
    "--proximal-mu": "federation.proximal-mu",
    "--transport-dtype": "federation.transport-dtype",
    "--modalities": "model.modalities",
    "--fusion": "model.fusion",
    "--lora-variant": "model.lora-variant",
    "--epsilon": "privacy.target-epsilon",
}


@contextlib.contextmanager
def _flags_named(given: set[str]) -> Iterator[None]:
    """A configuration error about a value an option set names the option too."""
    from wardround.common.errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        message = exc.message
        for flag in sorted(given):
            key = FLAG_KEYS[flag]
            message = message.replace(f"  - {key}:", f"  - {flag} ({key}):")
        if message == exc.message:
            raise
        hint = (exc.hint or "").replace("Fix the keys above", "Fix the values above")
        raise ConfigError(message, hint=hint or None) from None


def _simulation_out(out: Path | None, run_config) -> Path:  # noqa: ANN001
    """--out, else the config's own output.dir, else runs/simulate."""
    from wardround.common.config import OutputConfig

    if out is not None:
        return out
    if run_config.output.dir != OutputConfig().dir:
        return Path(run_config.output.dir)
    return Path("runs/simulate")


def _load_run_config(path: Path | None):  # noqa: ANN202 - RunConfig, imported late
    from wardround.common.config import RunConfig
    from wardround.ops.config_file import load_run_config

    return load_run_config(path) if path else RunConfig()


def _with_synthetic_patients(run_config, patients: int):  # noqa: ANN001, ANN202
    """The config with ``patients`` per synthetic site; refused for real sites."""
    if run_config.data.sites_dir:
        from wardround.common.errors import ConfigError

        raise ConfigError(
            "--patients sizes synthetic sites, but the config names real "
            f"ones (data.sites-dir = {run_config.data.sites_dir!r})",
            hint="Drop --patients, or data.sites-dir to simulate on "
            "synthetic hospitals.",
        )
    return run_config.with_overrides(data={"patients_per_site": patients})


def _comma_list(text: str | None) -> list[str] | None:
    return None if text is None else [m.strip() for m in text.split(",") if m.strip()]


def _with_overrides(run_config, **sections: dict):  # noqa: ANN001, ANN202
    """The config with every option the user gave (None: not given) applied."""
    given = {
        section: {key: value for key, value in values.items() if value is not None}
        for section, values in sections.items()
    }
    if not any(given.values()):
        return run_config
    return run_config.with_overrides(**given)


def _simulation_banner(run_config, n_sites: int) -> str:  # noqa: ANN001
    """One line saying what the simulation will run."""
    shape = (
        f"{run_config.model.family} ({run_config.task.kind.value}), "
        if run_config.model.generative
        else f"modalities {','.join(m.value for m in run_config.model.modalities)}, "
    )
    privacy = (
        f"DP-SGD ε={run_config.privacy.target_epsilon:g}"
        if run_config.privacy.enabled
        else "no DP"
    )
    aggregation = (
        "SecAgg+" if run_config.secure_aggregation.enabled else "plain aggregation"
    )
    return (
        f"wardround simulate: {n_sites} sites, {run_config.federation.rounds} rounds, "
        f"{run_config.federation.strategy.value}, {shape}{privacy}, {aggregation}"
        f" → {run_config.output.dir}"
    )


def _run_simulation(
    run_config,  # noqa: ANN001 - RunConfig, imported late
    out: Path,
    sites: int | None,
    rounds: int | None,
) -> None:
    """Run the federation with a progress bar and print its summary."""
    # Only the simulation commands import simulations, and only when they run.
    from wardround.simulations.runner import prepare_simulation, run_simulation_engine

    from .console import ProgressObserver, summary_table

    run_config, n_sites = prepare_simulation(
        run_config, out_dir=out, sites=sites, rounds=rounds
    )
    console.print(_simulation_banner(run_config, n_sites))
    _ensure_public_base(run_config)
    observer = ProgressObserver(console)
    started = time.time()
    interrupt_on_sigterm()  # processes are stopped first, as on Ctrl-C
    try:
        # RoundObserver's optional hooks are skipped for an observer that lacks
        # them (see its docstring); ProgressObserver has the two required ones.
        result = run_simulation_engine(
            run_config,
            n_sites,
            observer=cast("RoundObserver", observer),
            verbose=cli_flags["verbose"],
        )
    finally:
        observer.close()
    console.print(summary_table(result))
    for line in _site_data_notes(Path(run_config.data.sites_dir), started):
        err_console.print(Text(f"warning: {line}"), soft_wrap=True)
    console.print(
        f"run directory: {result.run_dir}  (adapter/, run.json, rounds.jsonl, plots/)"
    )


def _site_data_notes(sites_dir: Path, since: float) -> list[str]:
    """What the sites' data loaders noted in this run (they run where nothing shows)."""
    from wardround.sitedata.data_notes import describe_data_notes, read_data_notes
    from wardround.sitedata.site_config import SiteConfig

    lines: list[str] = []
    for site_toml in sorted(sites_dir.glob("*/site.toml")):
        site = SiteConfig.from_toml(site_toml)
        note = read_data_notes(site.cache_path, since)
        if note is not None:
            lines.extend(describe_data_notes(site.site.name, note))
    return lines


def _exit_interrupted(stop: BaseException) -> None:
    """Stop every Flower and Ray process and exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    # Ctrl-C arrives as KeyboardInterrupt, SIGTERM through our handler (or as
    # SystemExit if Ray's own handler got there first). By now ChildProcessGuard
    # has frozen Ray's processes; exit_killing kills them as it exits.
    sigterm = isinstance(stop, SystemExit) or sigterm_received()
    err_console.print("interrupted: Flower and Ray processes were stopped")
    sys.stdout.flush()
    from wardround.ops.processes import exit_killing

    # the ServerApp thread may still wait on replies; do not hang on it
    exit_killing(143 if sigterm else 130)


def _ensure_public_base(run_config) -> None:  # noqa: ANN001
    """Build the public pretrained base before the sites need it, where they can see why."""
    import time

    from wardround.common.config import FusionModelConfig
    from wardround.models.base_folder import MANIFEST
    from wardround.models.fusion import resolve_base_folder
    from wardround.models.public_base import public_base_path

    model = run_config.model
    if not isinstance(model, FusionModelConfig) or model.base != "pretrained":
        return
    folder = public_base_path(run_config)
    if (folder / MANIFEST).is_file():
        return
    start = time.perf_counter()
    with console.status(
        "building the public pretrained base (first use; cached for later runs)"
    ):
        built = resolve_base_folder(run_config)
    if built is not None:
        console.print(
            f"public pretrained base built in {time.perf_counter() - start:.0f} s: {built}"
        )


@app.command()
@user_errors
def synth(
    sites: Annotated[
        int, typer.Option(min=1, max=256, help="Number of hospitals.")
    ] = 3,
    out: Annotated[
        Path, typer.Option(help="Folder to write site-01/, site-02/, ... into.")
    ] = Path("sites"),
    patients: Annotated[int, typer.Option(min=10, help="Patients per site.")] = 300,
    seed: Annotated[
        int,
        typer.Option(min=0, help="Seed; the same seed writes the same data."),
    ] = 0,
    image_less_sites: Annotated[
        int,
        typer.Option(
            "--image-less-sites",
            min=0,
            max=256,
            help="How many sites (the last ones) have no imaging: EHR and notes "
            "only, no data.dicom-dirs. Equal to --sites: a folder of image-less sites.",
        ),
    ] = 0,
    postgres: Annotated[
        str | None,
        typer.Option(
            help="Also load each site's EHR into this PostgreSQL "
            "(postgresql://user@host:port/db; the password from $PGPASSWORD), one "
            "table per site, and write site-servers.toml beside site.toml.",
        ),
    ] = None,
    omop: Annotated[
        bool,
        typer.Option(
            help="With --postgres: load each site as OMOP CDM tables (one schema "
            "per site) read through the OMOP preset, instead of one flat table.",
        ),
    ] = False,
    pacs: Annotated[
        str | None,
        typer.Option(
            help="Also store each site's DICOM in this PACS over DICOMweb (STOW-RS; "
            "the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web) and name it "
            "in site-servers.toml; the password from $WARDROUND_PACS_PASSWORD.",
        ),
    ] = None,
    pacs_user: Annotated[
        str | None, typer.Option(help="The PACS's HTTP user (with --pacs).")
    ] = None,
    postgres_reader: Annotated[
        str | None,
        typer.Option(
            help="The read-only role site-servers.toml connects as (granted SELECT "
            "on the tables; its password from $WARDROUND_EHR_PASSWORD at run time).",
        ),
    ] = None,
) -> None:
    """Write synthetic hospitals: DICOM files, an EHR Parquet table and a site.toml each."""
    from urllib.parse import urlsplit

    from wardround.common.errors import ConfigError
    from wardround.synthetic.hospitals import synthesize_federation

    if postgres is not None and urlsplit(postgres).password is not None:
        raise ConfigError(
            "--postgres holds a password; it would be written into site-servers.toml",
            hint="Remove it from the url and export PGPASSWORD instead.",
        )

    paths = synthesize_federation(
        out,
        sites,
        patients_per_site=patients,
        seed=seed,
        image_less_sites=image_less_sites,
    )
    for path in paths:
        console.print(f"wrote {path}")
    if postgres is not None or pacs is not None:
        _load_servers(paths, postgres, postgres_reader, pacs, pacs_user, omop=omop)


def _load_servers(
    paths: list[Path],
    postgres: str | None,
    reader: str | None,
    pacs: str | None,
    pacs_user: str | None,
    *,
    omop: bool = False,
) -> None:
    """``synth --postgres/--pacs``: each site into the servers, and site-servers.toml."""
    import os
    import tomllib
    from urllib.parse import urlsplit, urlunsplit

    from wardround.simulations.hospital_servers import (
        load_ehr_into_omop,
        load_ehr_into_postgres,
        store_folder_in_pacs,
        write_server_site_toml,
    )

    for path in paths:
        database: dict[str, Any] | None = None
        pacs_table: dict[str, Any] | None = None
        if postgres is not None:
            parts = urlsplit(postgres)
            site_url = postgres
            if reader is not None:
                host = parts.netloc.rpartition("@")[2]
                site_url = urlunsplit(
                    (parts.scheme, f"{reader}@{host}", parts.path, "", "")
                )
            password = os.environ.get("PGPASSWORD")
            database = {
                "url": site_url,
                "password-env": "WARDROUND_EHR_PASSWORD",
            }
            if omop:
                preset, rows = load_ehr_into_omop(
                    path, postgres, password, grant_to=reader
                )
                database["omop"] = preset
                where = f"OMOP CDM schema {preset['cdm-schema']}"
            else:
                table, rows = load_ehr_into_postgres(
                    path, postgres, password, grant_to=reader
                )
                database["table"] = table
                where = table
            console.print(f"loaded {rows} EHR rows into {where}")
        dicom_dirs = tomllib.loads(path.read_text())["data"].get("dicom-dirs", [])
        if pacs is not None and dicom_dirs:
            password = os.environ.get("WARDROUND_PACS_PASSWORD")
            stored = sum(
                store_folder_in_pacs(path.parent / d, pacs, pacs_user, password)
                for d in dicom_dirs
            )
            console.print(f"stored {stored} DICOM files in the PACS at {pacs}")
            pacs_table = {"protocol": "dicomweb", "url": pacs}
            if pacs_user is not None:
                pacs_table |= {
                    "username": pacs_user,
                    "password-env": "WARDROUND_PACS_PASSWORD",
                }
        servers = write_server_site_toml(path, database=database, pacs=pacs_table)
        console.print(f"wrote {servers}")


@app.command()
@user_errors
def pretrain(
    out: Annotated[
        Path, typer.Option(help="Folder to write the base into (save_pretrained).")
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            help="Run config TOML whose shapes (image size, hidden size, task's EHR "
            "features) the base is built for; default: the default run config.",
            dir_okay=False,
        ),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Folder of public sites (site-*/site.toml, as `wardround synth` "
            "writes them); labels are never read. Default: the public synthetic "
            "corpus (its own seed and generator settings).",
            file_okay=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 400,
    batch_size: Annotated[
        int, typer.Option(min=2, help="Examples per step (all from one site).")
    ] = 128,
    seed: Annotated[int, typer.Option(help="Pretraining seed.")] = 0,
) -> None:
    """Pretrain the fusion family's encoders without labels (cross-modal contrastive).

    Writes a base folder that model.base names. The same command, corpus and
    settings rebuild the same tensors on the same machine and thread count.
    """
    from rich.progress import Progress

    from wardround.common.config import FusionModelConfig
    from wardround.common.errors import ConfigError
    from wardround.models.pretraining import PretrainSettings

    run_config = _load_run_config(config)
    if not isinstance(run_config.model, FusionModelConfig):
        raise ConfigError(
            f"model.family {run_config.model.family!r} has no pretraining here",
            hint="Pretraining is for the fusion family; a vlm uses its checkpoint.",
        )
    settings = PretrainSettings(steps=steps, batch_size=batch_size, seed=seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("pretraining", total=steps)

        def on_step(step: int, loss: float) -> None:
            progress.update(
                task, completed=step + 1, description=f"pretraining (loss {loss:.3f})"
            )

        manifest = _pretrain(run_config, out, corpus, settings, on_step)
    console.print(
        f"wrote {out} ({sum(manifest['corpus_examples'])} corpus examples, "
        f"{steps} steps in {manifest['seconds']} s, loss "
        f"{manifest['loss_first']:.3f} -> {manifest['loss_last_tenth']:.3f}); "
        f'use it with model.base = "{out}"'
    )


def _pretrain(run_config, out: Path, corpus: Path | None, settings, on_step) -> dict:  # noqa: ANN001
    """Pretrain on the public synthetic corpus, or on the site folders in ``corpus``."""
    import tempfile

    from wardround.common.errors import ConfigError
    from wardround.models.public_base import build_public_base, pretrain_base

    if corpus is None:
        with tempfile.TemporaryDirectory() as scratch:
            return build_public_base(
                run_config, out, Path(scratch), settings=settings, on_step=on_step
            )
    tomls = sorted(corpus.glob("*/site.toml"))
    if not tomls:
        raise ConfigError(
            f"{corpus} holds no site folder (*/site.toml)",
            hint="Point --corpus at a folder of site folders.",
        )
    source = {"kind": "sites", "sites": [t.parent.name for t in tomls]}
    return pretrain_base(run_config, tomls, out, settings, source, on_step)


@app.command("config")
@user_errors
def show_config(
    config: Annotated[
        Path | None,
        typer.Option(help="A run config TOML file to validate.", dir_okay=False),
    ] = None,
) -> None:
    """Print the run config (defaults filled in) as TOML, after validating it."""
    import tomli_w

    run_config = _load_run_config(config)
    sys.stdout.write(tomli_w.dumps(run_config.model_dump(mode="json", by_alias=True)))


def main() -> None:
    """Console-script entry point."""
    app()


def _register_groups() -> None:
    from wardround.client.cli import site_app
    from wardround.dashboard_cli import dashboard_command
    from wardround.deploy.cli import certs_app, keys_app
    from wardround.ops.audit_cli import audit_command
    from wardround.server.admin_cli import (
        coordinator_app,
        launch,
        runs,
        sites_app,
        stop,
    )
    from wardround.simulations.study.cli import study_app

    app.add_typer(
        site_app,
        name="site",
        help="A site: check its data, run its daemon, approve runs, see its privacy.",
    )
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(sites_app, name="sites")
    app.command("launch")(launch)
    app.command("runs")(runs)
    app.command("stop")(stop)
    app.add_typer(certs_app, name="certs")
    app.add_typer(keys_app, name="keys")
    app.command("audit")(audit_command)
    app.command("dashboard")(dashboard_command)
    app.add_typer(
        study_app,
        name="study",
        help="Studies on synthetic hospitals: federated vs pooled vs local-only.",
    )


_register_groups()


if __name__ == "__main__":
    main()
