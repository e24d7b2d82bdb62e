"""The ``wardround`` command line: one entry point for all three kinds of user.

User errors (``WardroundError``) are shown as one paragraph with what to fix and
a non-zero exit code; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(
    name="wardround",
    no_args_is_help=True,
    add_completion=False,
    # locals could hold patient values: never print them in a traceback
    pretty_exceptions_show_locals=False,
    help="Federated LoRA fine-tuning of multimodal medical models across hospitals.",
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


def _fail(exc: Exception) -> None:
    from wardround.common.errors import WardroundError

    if isinstance(exc, WardroundError) and not _state["debug"]:
        # Messages quote site.toml keys like [ehr.features]: print them as plain text.
        err_console.print(
            Text.assemble((f"{exc.title}: ", "bold red"), exc.message), soft_wrap=True
        )
        if exc.hint:
            err_console.print(Text(exc.hint), soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    raise exc


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    _state["signal"] = signum
    raise KeyboardInterrupt


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")
    ] = False,
) -> None:
    _state["debug"] = debug
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def simulate(
    sites: Annotated[
        int | None,
        typer.Option(min=1, max=256, help="Synthetic sites to make (default 3)."),
    ] = None,
    patients: Annotated[
        int | None,
        typer.Option(
            min=10,
            max=1_000_000,
            help="Patients per synthetic site (default: the config's, 300).",
        ),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Rounds (default: the config's, 5).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A run config TOML file.", dir_okay=False)
    ] = None,
    out: Annotated[Path, typer.Option(help="The run directory to write.")] = Path(
        "runs/simulate"
    ),
    strategy: Annotated[
        str | None, typer.Option(help="fedavg or fedprox (overrides the config).")
    ] = None,
    proximal_mu: Annotated[
        float | None, typer.Option("--proximal-mu", help="FedProx's mu.")
    ] = None,
    modalities: Annotated[
        str | None, typer.Option(help="Comma list of image,ehr,note (ablations).")
    ] = None,
    fusion: Annotated[
        str | None, typer.Option(help="concat, gated or cross-attention.")
    ] = None,
    dp: Annotated[
        bool | None,
        typer.Option(
            "--dp/--no-dp", help="DP-SGD at every site (default: on, from the config)."
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(help="Target epsilon of the run at each site (default 8)."),
    ] = None,
    secure_aggregation: Annotated[
        bool | None,
        typer.Option(
            "--secagg/--no-secagg",
            help="Flower SecAgg+ (default: on); --no-secagg aggregates in the clear "
            "(debugging).",
        ),
    ] = None,
    lora_variant: Annotated[
        str | None,
        typer.Option(help="lora (A and B train) or ffa (FFA-LoRA: B only)."),
    ] = None,
) -> None:
    """Run a whole federation on this machine (synthetic hospitals unless given data)."""
    try:
        from wardround.common.config import RunConfig
        from wardround.simulations.runner import (
            prepare_simulation,
            run_simulation_engine,
        )

        from .console import ProgressObserver, summary_table

        run_config = RunConfig.from_toml(config) if config else RunConfig()
        if patients is not None:
            if run_config.data.sites_dir:
                from wardround.common.errors import ConfigError

                raise ConfigError(
                    "--patients sizes synthetic sites, but the config names real "
                    f"ones (data.sites-dir = {run_config.data.sites_dir!r})",
                    hint="Drop --patients, or data.sites-dir to simulate on "
                    "synthetic hospitals.",
                )
            run_config = run_config.with_overrides(data={"patients_per_site": patients})
        federation: dict = {}
        model: dict = {}
        if strategy is not None:
            federation["strategy"] = strategy
        if proximal_mu is not None:
            federation["proximal_mu"] = proximal_mu
        if modalities is not None:
            model["modalities"] = [
                m.strip() for m in modalities.split(",") if m.strip()
            ]
        if fusion is not None:
            model["fusion"] = fusion
        if lora_variant is not None:
            model["lora_variant"] = lora_variant
        privacy: dict = {}
        if dp is not None:
            privacy["enabled"] = dp
        if epsilon is not None:
            privacy["target_epsilon"] = epsilon
        secagg: dict = {}
        if secure_aggregation is not None:
            secagg["enabled"] = secure_aggregation
        if federation or model or privacy or secagg:
            run_config = run_config.with_overrides(
                federation=federation,
                model=model,
                privacy=privacy,
                secure_aggregation=secagg,
            )
        run_config, n_sites = prepare_simulation(
            run_config, out_dir=out, sites=sites, rounds=rounds
        )
        console.print(
            f"wardround simulate: {n_sites} sites, {run_config.federation.rounds} rounds, "
            f"{run_config.federation.strategy.value}, "
            + (
                f"{run_config.model.family} ({run_config.task.kind.value}), "
                if run_config.model.generative
                else "modalities "
                f"{','.join(m.value for m in run_config.model.modalities)}, "
            )
            + (
                f"DP-SGD ε={run_config.privacy.target_epsilon:g}"
                if run_config.privacy.enabled
                else "no DP"
            )
            + ", "
            + (
                "SecAgg+"
                if run_config.secure_aggregation.enabled
                else "plain aggregation"
            )
            + f" → {run_config.output.dir}"
        )
        _ensure_public_base(run_config)
        observer = ProgressObserver(console)
        # SIGTERM (systemd, a scheduler) stops the run like Ctrl-C: processes first.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            result = run_simulation_engine(
                run_config,
                n_sites,
                observer=observer,
                verbose=_state.get("verbose", False),
            )
        finally:
            observer.close()
        console.print(summary_table(result))
        console.print(
            f"run directory: {result.run_dir}  (adapter/, run.json, rounds.jsonl, plots/)"
        )
    except (KeyboardInterrupt, SystemExit) as stop:
        # Ctrl-C arrives as KeyboardInterrupt, SIGTERM through our handler (or as
        # SystemExit if Ray's own handler got there first). By now ChildProcessGuard
        # has frozen Ray's processes; exit_killing kills them as it exits.
        sigterm = isinstance(stop, SystemExit) or _state.get("signal") == signal.SIGTERM
        code = 143 if sigterm else 130
        err_console.print("interrupted: Flower and Ray processes were stopped")
        sys.stdout.flush()
        from wardround.common.processes import exit_killing

        # the ServerApp thread may still wait on replies; do not hang on it
        exit_killing(code)
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes in _fail
        _fail(exc)


def _ensure_public_base(run_config) -> None:
    """Build the public pretrained base before the sites need it, where they can see why."""
    import time

    from wardround.common.config import FusionModelConfig
    from wardround.common.models.base_folder import MANIFEST
    from wardround.common.models.fusion import resolve_base_folder
    from wardround.simulations.public_base import public_base_path

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
def synth(
    sites: Annotated[
        int, typer.Option(min=1, max=256, help="Number of hospitals.")
    ] = 3,
    out: Annotated[
        Path, typer.Option(help="Folder to write site-01/, site-02/, ... into.")
    ] = Path("sites"),
    patients: Annotated[int, typer.Option(min=10, help="Patients per site.")] = 300,
    seed: Annotated[
        int, typer.Option(help="Seed; the same seed writes the same data.")
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
) -> None:
    """Write synthetic hospitals: DICOM files, an EHR Parquet table and a site.toml each."""
    try:
        from wardround.simulations.synth import synthesize_federation

        paths = synthesize_federation(
            out,
            sites,
            patients_per_site=patients,
            seed=seed,
            image_less_sites=image_less_sites,
        )
        for path in paths:
            console.print(f"wrote {path}")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
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
    try:
        import tempfile

        from rich.progress import Progress

        from wardround.common.config import FusionModelConfig, RunConfig
        from wardround.common.errors import ConfigError
        from wardround.common.models.pretraining import PretrainSettings
        from wardround.simulations.public_base import (
            build_public_base,
            pretrain_base,
        )

        run_config = RunConfig.from_toml(config) if config else RunConfig()
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
                    task,
                    completed=step + 1,
                    description=f"pretraining (loss {loss:.3f})",
                )

            if corpus is None:
                with tempfile.TemporaryDirectory() as scratch:
                    manifest = build_public_base(
                        run_config,
                        out,
                        Path(scratch),
                        settings=settings,
                        on_step=on_step,
                    )
            else:
                tomls = sorted(corpus.glob("*/site.toml"))
                if not tomls:
                    raise ConfigError(
                        f"{corpus} holds no site folder (*/site.toml)",
                        hint="Point --corpus at a folder of site folders.",
                    )
                source = {"kind": "sites", "sites": [t.parent.name for t in tomls]}
                manifest = pretrain_base(
                    run_config, tomls, out, settings, source, on_step
                )
        console.print(
            f"wrote {out} ({sum(manifest['corpus_examples'])} corpus examples, "
            f"{steps} steps in {manifest['seconds']} s, loss "
            f"{manifest['loss_first']:.3f} -> {manifest['loss_last_tenth']:.3f}); "
            f'use it with model.base = "{out}"'
        )
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command("config")
def show_config(
    config: Annotated[
        Path | None,
        typer.Option(help="A run config TOML file to validate.", dir_okay=False),
    ] = None,
) -> None:
    """Print the run config (defaults filled in) as TOML, after validating it."""
    try:
        import tomli_w

        from wardround.common.config import RunConfig

        run_config = RunConfig.from_toml(config) if config else RunConfig()
        sys.stdout.write(
            tomli_w.dumps(run_config.model_dump(mode="json", by_alias=True))
        )
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


def main() -> None:
    """Console-script entry point."""
    app()


def _register_groups() -> None:
    from wardround.client.cli import site_app
    from wardround.common.audit_cli import audit_command
    from wardround.dashboard.cli import dashboard_command
    from wardround.deploy.cli import certs_app, keys_app
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
