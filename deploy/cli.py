"""The ``wardround certs`` and ``wardround keys`` command groups.

Registered by ``wardround/cli.py`` with ``app.add_typer(certs_app, name="certs")``
and ``app.add_typer(keys_app, name="keys")``. ``cryptography`` is imported inside
the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Annotated

import typer

from wardround.cli_support import ForceOption, command_group, user_errors

certs_app = command_group(
    "certs",
    help="Create the federation's CA and the coordinator's TLS certificate.",
)
keys_app = command_group(
    "keys",
    help="Create the key pairs sites authenticate to the coordinator with.",
)


def _echo_written(*paths: Path) -> None:
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        typer.echo(f"wrote {path} (mode {mode:04o})")


@certs_app.command("init")
@user_errors
def init(
    out: Annotated[Path, typer.Option("--out", help="folder for ca.pem and ca.key")],
    name: Annotated[
        str, typer.Option("--name", help="the CA's common name")
    ] = "wardround CA",
    days: Annotated[int, typer.Option("--days", help="validity in days")] = 3650,
    force: ForceOption = False,
) -> None:
    """Create the federation's certificate authority (EC P-384, self-signed)."""
    from wardround.pki import init_ca

    files = init_ca(out, name, days, force=force)
    _echo_written(files.cert, files.key)
    typer.echo(f"keep {files.key} offline and private; give {files.cert} to every site")
    typer.echo(
        f"next: wardround certs server --ca {out} --host HOST --ip 127.0.0.1 "
        "--out DIR  (the coordinator's TLS certificate: HOST is the name sites "
        "dial; 127.0.0.1 is for the admin commands on the coordinator host)"
    )


@certs_app.command("server")
@user_errors
def server(
    ca: Annotated[Path, typer.Option("--ca", help="folder holding ca.pem and ca.key")],
    out: Annotated[
        Path, typer.Option("--out", help="folder for NAME.pem and NAME.key")
    ],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="DNS name sites connect to (repeatable)"),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option(
            "--ip",
            help="IP address sites connect to (repeatable); the coordinator's "
            "certificate also needs 127.0.0.1, where the admin commands connect",
        ),
    ] = None,
    name: Annotated[
        str, typer.Option("--name", help="base name of the two files")
    ] = "coordinator",
    days: Annotated[int, typer.Option("--days", help="validity in days")] = 825,
    force: ForceOption = False,
) -> None:
    """Issue the coordinator's TLS server certificate, signed by the CA."""
    from wardround.pki import CA_CERT_NAME, issue_server_certificate

    files = issue_server_certificate(
        ca, host or [], ip or [], out, name, days, force=force
    )
    _echo_written(files.cert, files.key)
    if "127.0.0.1" not in (ip or []):
        typer.echo(
            "warning: the certificate does not name 127.0.0.1; `wardround coordinator "
            "start` refuses it as the coordinator's (the admin commands reach the "
            "SuperLink on loopback). Issue it again with --ip 127.0.0.1 --force.",
            err=True,
        )
    typer.echo(
        f"coordinator.toml [tls]: ca-certificate = {_toml_path(ca / CA_CERT_NAME)}, "
        f"certificate = {_toml_path(files.cert)}, "
        f"private-key = {_toml_path(files.key)}"
    )
    typer.echo(
        "each site.toml [deployment]: root-certificate = the path of its copy of "
        f"{(ca / CA_CERT_NAME).resolve()}"
    )


def _toml_path(path: Path) -> str:
    """``path`` made absolute, as a TOML string.

    A config's relative paths are read from its own folder, not from where this
    command ran.
    """
    return json.dumps(str(Path(path).resolve()))


@certs_app.command("show")
@user_errors
def show(
    files: Annotated[list[Path], typer.Argument(help="PEM certificate file(s)")],
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
) -> None:
    """Describe certificates; warn about those expiring within 30 days."""
    from wardround.pki import describe_certificate, expiry_warning

    infos = [describe_certificate(path) for path in files]
    if as_json:
        payload = [
            {**info.to_dict(), "warning": expiry_warning(info)} for info in infos
        ]
        typer.echo(json.dumps(payload, indent=2))
        return
    for index, info in enumerate(infos):
        if index:
            typer.echo("")
        typer.echo(str(info.path))
        rows = {
            "subject": info.subject_cn,
            "issuer": info.issuer_cn,
            "CA": "yes" if info.is_ca else "no",
            "DNS names": ", ".join(info.dns_names) or "-",
            "IPs": ", ".join(info.ip_addresses) or "-",
            "not after": info.not_after.strftime("%Y-%m-%d %H:%M UTC"),
            "days left": str(info.days_left),
            "key": info.key_type,
            "sha256": info.sha256_fingerprint,
        }
        for label, value in rows.items():
            typer.echo(f"  {label + ':':<11} {value}")
        warning = expiry_warning(info)
        if warning:
            typer.echo(f"  WARNING: {warning}; issue a new certificate")


@keys_app.command("site")
@user_errors
def site(
    name: Annotated[str, typer.Argument(help="the site's name (letters, digits, - _)")],
    out: Annotated[
        Path, typer.Option("--out", help="folder for NAME.key and NAME.pub")
    ],
    force: ForceOption = False,
) -> None:
    """Create a site's SuperNode authentication key pair (EC P-384, OpenSSH)."""
    from wardround.pki import generate_site_keypair, public_key_fingerprint

    files = generate_site_keypair(name, out, force=force)
    fingerprint = public_key_fingerprint(files.public_key)
    _echo_written(files.private_key, files.public_key)
    typer.echo(f"public key sha256: {fingerprint}")
    typer.echo(
        "the private key stays at the site: site.toml [deployment] private-key = "
        f"{_toml_path(files.private_key)}"
    )
    typer.echo(
        f"next, at the coordinator: wardround sites add {name} "
        f"--key {files.public_key} --config coordinator.toml"
    )
