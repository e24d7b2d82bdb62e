"""The deployment files in deploy/ parse, and every wardround command they use exists.

Commands come from the systemd units' ExecStart, the compose services' ``command:``
(run by the image's ENTRYPOINT ``wardround``) and the ```bash/```sh blocks of
deploy/README.md. Each is checked against the real CLI with ``--help``.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from wardround.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = {
    "coordinator": DEPLOY / "systemd" / "wardround-coordinator.service",
    "site": DEPLOY / "systemd" / "wardround-site.service",
}
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
README = DEPLOY / "README.md"

# Options of the root callback, which may come before the first sub-command.
ROOT_FLAGS = {"--debug", "--verbose", "-v"}

runner = CliRunner()


# ------------------------------------------------------------------- the files


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(path.read_text(), source=str(path))
    return parser


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends with a line continuation"
    return instructions


def _all_values(path: Path, key: str) -> list[str]:
    """Every value of a unit key that may repeat (configparser keeps the last)."""
    return [
        line.split("=", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_unit(role):
    unit = _unit(UNITS[role])
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert service.get("ExecStart"), "ExecStart missing"
    exec_start = shlex.split(service["ExecStart"])
    assert exec_start[0] == "/opt/wardround/venv/bin/wardround"
    assert exec_start[1:] == [
        role,
        "start",
        "--config",
        f"/etc/wardround/{role}.toml",
    ]
    assert service.get("Restart") == "on-failure"
    assert service.get("User") == "wardround"
    assert service.get("KillSignal") == "SIGTERM"
    assert service.get("TimeoutStopSec") == "60"
    assert "FLWR_TELEMETRY_ENABLED=0" in service.get("Environment", "").split()
    assert service.get("NoNewPrivileges") == "yes"
    assert service.get("ProtectSystem") == "strict"
    assert service.get("PrivateTmp") == "yes"
    assert service.get("ProtectHome") in {"yes", "read-only", "tmpfs"}
    assert f"/var/lib/wardround/{role}" in service.get("ReadWritePaths", "").split()
    # the pretrained base is built on first use: its cache must be writable
    assert f"WARDROUND_CACHE=/var/cache/{service.get('CacheDirectory')}" in (
        service.get("Environment", "").split()
    )
    assert "network-online.target" in unit["Unit"].get("After", "").split()
    assert unit["Install"].get("WantedBy") == "multi-user.target"
    if role == "site":
        assert "ReadOnlyPaths" in service
        assert "# DeviceAllow=" in UNITS[role].read_text()


@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_unit_is_hardened(role):
    service = _unit(UNITS[role])["Service"]
    assert service.get("UMask") == "0077"
    assert service.get("CapabilityBoundingSet") == ""
    assert service.get("AmbientCapabilities") == ""
    assert service.get("ProtectHome") == "yes"
    assert service.get("ReadWritePaths") == f"/var/lib/wardround/{role}"
    for key in (
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "RestrictNamespaces",
        "LockPersonality",
        "RemoveIPC",
    ):
        assert service.get(key) == "yes", key
    families = set(service.get("RestrictAddressFamilies", "").split())
    assert families and families <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    filters = _all_values(UNITS[role], "SystemCallFilter")
    assert "@system-service" in filters and "~@privileged" in filters
    assert service.get("SystemCallArchitectures") == "native"
    # The coordinator needs no device; a GPU site needs /dev/nvidia*.
    if role == "coordinator":
        assert service.get("PrivateDevices") == "yes"
        assert service.get("StateDirectoryMode") == "0700"
    else:
        assert "PrivateDevices" not in service


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        found[container] = host
    return found


def test_compose_services():
    compose = _compose()
    services = compose["services"]
    assert {"coordinator", "site-01", "site-02"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        build = service.get("build")
        if isinstance(build, dict):
            context = COMPOSE.parent / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.resolve() == DOCKERFILE.resolve(), name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
    for site in ("site-01", "site-02"):
        assert f"./sites/{site}:/data/{site}" in services[site]["volumes"]


def test_compose_publishes_only_the_fleet_port_on_loopback_by_default():
    services = _compose()["services"]
    publishing = sorted(name for name, s in services.items() if s.get("ports"))
    assert publishing == ["coordinator"], "only the coordinator publishes ports"
    (port,) = services["coordinator"]["ports"]  # nginx's; never the SuperLink's
    assert port["target"] == 9093 and str(port["published"]) == "9093"
    assert port["host_ip"] == "${WARDROUND_PUBLISH_ADDRESS:-127.0.0.1}"
    assert all("expose" not in s for s in services.values())


def test_compose_containers_see_no_private_key_but_their_own():
    services = _compose()["services"]
    coordinator = _mounts(services["coordinator"])
    assert coordinator["/etc/wardround/pki/ca.pem"] == "./pki/ca.pem"
    assert coordinator["/etc/wardround/pki/coordinator.key"] == "./pki/coordinator.key"
    for name, service in services.items():
        mounts = _mounts(service)
        assert "./pki" not in mounts.values(), f"{name} mounts all of pki/"
        assert "./pki/ca.key" not in mounts.values(), f"{name} mounts the CA key"
        if name != "coordinator":
            pki = sorted(h for h in mounts.values() if h.startswith("./pki"))
            assert pki == ["./pki/ca.pem"], f"{name} mounts {pki}"


def test_dockerfile():
    instructions = _dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms and froms[0].split()[0] == "python:3.11-slim"
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["wardround"], "ENTRYPOINT must be JSON form"
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in (
        instructions
    )
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch_at = next(i for i, a in enumerate(runs) if "torch==2.13.0" in a)
    package_at = next(i for i, a in enumerate(runs) if 'install ".[codecs]"' in a)
    assert torch_at < package_at, "torch must be installed before the package"
    assert "TORCH_INDEX_URL" in runs[torch_at]
    assert " ".join(a for k, a in instructions if k == "EXPOSE").split() == ["9093"]
    apt = next(a for k, a in instructions if k == "RUN" and "apt-get install" in a)
    assert "nginx" in apt.split(), "the coordinator runs nginx in front of Flower"
    # `pip install .` fails on a package folder the image lacks
    with (DEPLOY.parent / "pyproject.toml").open("rb") as f:
        package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    copied = {a.split()[0] for k, a in instructions if k == "COPY"}
    missing = {path.split("/")[0] for path in package_dirs.values()} - copied
    assert not missing, f"the Dockerfile does not COPY {sorted(missing)}"
    last_install = max(
        i for i, (k, a) in enumerate(instructions) if k == "RUN" and "pip install" in a
    )
    last_user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert last_user > last_install, "switch to the non-root USER after the installs"


# ------------------------------------------------------------ command discovery


@dataclass
class Usage:
    """One command line as written in a deployment file."""

    argv: list[str]  # without the leading "wardround"
    sources: list[str] = field(default_factory=list)

    @property
    def words(self) -> tuple[str, ...]:
        """The words before the first option: sub-commands, then positional args."""
        argv = list(self.argv)
        while argv and argv[0] in ROOT_FLAGS:
            argv.pop(0)
        words = []
        for word in argv:
            if word.startswith("-"):
                break
            words.append(word)
        return tuple(words)


def _unit_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in UNITS.values():
        exec_start = _unit(path)["Service"].get("ExecStart", "")
        argv = shlex.split(exec_start)
        if argv and Path(argv[0].lstrip("-@+!:")).name == "wardround":
            found.append((f"{path.relative_to(ROOT)} ExecStart", argv[1:]))
    return found


def _compose_commands() -> list[tuple[str, list[str]]]:
    found = []
    for name, service in (_compose().get("services") or {}).items():
        command = service.get("command")
        if command is None:
            continue
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        entrypoint = service.get("entrypoint")
        if entrypoint is not None:  # a service that overrides the image's entrypoint
            entry = (
                shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint
            )
            if not entry or Path(entry[0]).name != "wardround":
                continue
            argv = [*entry[1:], *argv]
        found.append((f"{COMPOSE.relative_to(ROOT)} services.{name}.command", argv))
    return found


def _readme_commands() -> list[tuple[str, list[str]]]:
    """`wardround ...` lines of the ```bash and ```sh blocks (continuations joined)."""
    found = []
    in_shell = in_other = False
    pending, pending_line = "", 0
    for number, raw in enumerate(README.read_text().splitlines(), start=1):
        line = raw.strip()
        if line.startswith("```"):
            if in_shell or in_other:
                in_shell = in_other = False
            else:
                language = line[3:].strip().lower()
                in_shell = language in {"bash", "sh"}
                in_other = not in_shell
            pending = ""
            continue
        if not in_shell:
            continue
        if not pending:
            pending_line = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("wardround "):
            argv = shlex.split(line, comments=True)
            found.append((f"{README.relative_to(ROOT)}:{pending_line}", argv[1:]))
    return found


def _usages() -> list[Usage]:
    by_words: dict[tuple[str, ...], Usage] = {}
    for source, argv in _unit_commands() + _compose_commands() + _readme_commands():
        usage = Usage(argv, [source])
        if usage.words in by_words:
            by_words[usage.words].sources.append(source)
        else:
            by_words[usage.words] = usage
    return list(by_words.values())


USAGES = _usages()


# ------------------------------------------------------------- command lookup


@dataclass
class Resolution:
    """How far a command line's words resolve in the CLI."""

    words: tuple[str, ...]
    resolved: tuple[str, ...]  # the longest prefix whose --help exits 0
    is_command: bool  # resolved ends at a command (not at a group or the root)
    error: str = ""  # why the next word did not resolve

    @property
    def missing(self) -> str | None:
        """The command that does not exist, as `wardround a b`; None if all exist."""
        if self.is_command:
            return None
        if len(self.resolved) < len(self.words):
            return "wardround " + " ".join(self.words[: len(self.resolved) + 1])
        return "wardround " + " ".join(self.resolved) + " <no sub-command given>"


def _help(words: tuple[str, ...]) -> tuple[int, str]:
    result = runner.invoke(app, [*words, "--help"])
    return result.exit_code, result.output


def _reason(output: str) -> str:
    match = re.search(r"No such command '[^']*'\.?", output)
    if match:
        return match.group(0)
    lines = [line.strip(" │╭╮╰╯─") for line in output.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "no output"


def resolve(argv: list[str]) -> Resolution:
    """Walk the sub-commands of ``argv`` with ``--help`` until a command is reached.

    Successively longer prefixes of the words before the first option are tried;
    the walk stops at the first prefix whose ``--help`` fails, or once the prefix
    names a command (not a group): the words after it are positional arguments.
    """
    words = Usage(argv).words
    node: click.Command = typer.main.get_command(app)
    resolved: tuple[str, ...] = ()
    for word in words:
        prefix = (*resolved, word)
        code, output = _help(prefix)
        if code != 0:
            return Resolution(words, resolved, False, _reason(output))
        assert isinstance(node, click.Group)
        child = node.get_command(click.Context(node), word)
        assert child is not None, f"--help of {prefix} exits 0 but no command {word!r}"
        node, resolved = child, prefix
        if not isinstance(node, click.Group):
            return Resolution(words, resolved, True)
    return Resolution(words, resolved, False, "")


# ------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["site", "check", "--config", "site.toml"], ("site", "check")),
        (["site", "privacy", "--config", "site.toml", "--json"], ("site", "privacy")),
        (["--verbose", "simulate", "--sites", "2"], ("simulate",)),
        (["synth", "--sites", "2", "--out", "sites"], ("synth",)),
        (["config", "--config", "run.toml"], ("config",)),
    ],
    ids=["site check", "site privacy", "simulate", "synth", "config"],
)
def test_resolve_finds_existing_commands(argv, expected):
    resolution = resolve(argv)
    assert resolution.resolved == expected
    assert resolution.missing is None


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["no-such-group", "start", "--config", "x"], "wardround no-such-group"),
        (["site", "no-such-command", "ARG"], "wardround site no-such-command"),
        (["site", "--config", "x"], "wardround site <no sub-command given>"),
    ],
    ids=["unknown group", "unknown sub-command", "group without sub-command"],
)
def test_resolve_reports_missing_commands(argv, missing):
    resolution = resolve(argv)
    assert resolution.missing == missing
    if "<no sub-command" not in missing:
        assert "No such command" in resolution.error


def test_deployment_commands_were_found():
    words = {usage.words[:2] for usage in USAGES}
    # the daemons, from the units and from compose
    assert {("coordinator", "start"), ("site", "start")} <= words
    sources = " ".join(s for usage in USAGES for s in usage.sources)
    assert "ExecStart" in sources and "services.site-01.command" in sources
    # the operator guide's commands
    for expected in [("certs", "init"), ("sites", "add"), ("site", "approve")]:
        assert expected in words, expected
    assert {("launch",), ("runs",), ("audit",)} <= {w[:1] for w in words}


@pytest.mark.parametrize("usage", USAGES, ids=[" ".join(u.words) for u in USAGES])
def test_deployment_command_exists(usage):
    resolution = resolve(usage.argv)
    if resolution.missing is None:
        assert resolution.resolved, "resolved only to the root"
        return
    known = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    where = "\n  ".join(usage.sources)
    pytest.fail(
        f"{resolution.missing} does not exist"
        + (f" ({resolution.error})" if resolution.error else "")
        + f"\n  command line: wardround {shlex.join(usage.argv)}"
        + f"\n  resolved as far as: wardround {' '.join(resolution.resolved) or '(the root only)'}"
        + f"\n  top-level commands now: {', '.join(known)}"
        + f"\n  used in:\n  {where}",
        pytrace=False,
    )
