"""The coordinator's admin side: coordinator.toml, TLS checks, SuperLink commands.

The run launcher is tested in test_deploy_launcher.py, enrolled sites in
test_deploy_registry.py.
"""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
from coordinator_files import TLS_TABLE
from coordinator_files import coordinator_config as _coordinator
from coordinator_files import file_mode as _mode

from wardround.common.errors import ConfigError, FederationError
from wardround.deploy.loopback import free_port
from wardround.pki import (
    init_ca,
    issue_server_certificate,
)
from wardround.server.coordinator import (
    check_tls,
    superexec_command,
    superlink_command,
    write_superexec_secret,
)
from wardround.server.coordinator_config import CoordinatorConfig

# ------------------------------------------------------------- coordinator.toml


def test_coordinator_paths_resolve_against_the_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "wardround"
    folder.mkdir(parents=True)
    (folder / "coordinator.toml").write_text(
        '[coordinator]\nport = 9500\nstate-dir = "../state"\n' + TLS_TABLE
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = CoordinatorConfig.from_toml(
        Path("..") / "etc" / "wardround" / "coordinator.toml"
    )
    assert config.ca_path == folder / "tls" / "ca.pem"
    assert config.certificate_path == folder / "tls" / "coordinator.pem"
    assert config.private_key_path == folder / "tls" / "coordinator.key"
    assert config.state_path == tmp_path / "etc" / "state"
    assert config.sites_path == tmp_path / "etc" / "state" / "sites.json"
    assert config.runs_path == tmp_path / "etc" / "state" / "runs"
    assert config.audit_path == tmp_path / "etc" / "state" / "audit.jsonl"
    assert config.flwr_home == tmp_path / "etc" / "state" / "flwr-home"
    # the admin commands reach the SuperLink on loopback, on the internal port
    assert config.coordinator.internal_port == 9094
    assert config.admin_address == "127.0.0.1:9094"
    assert config.internal_address == "127.0.0.1:9094"
    assert (
        config.superexec_secret_path == tmp_path / "etc" / "state" / "superexec.secret"
    )
    assert config.nginx_path == tmp_path / "etc" / "state" / "nginx"


def test_coordinator_absolute_paths_and_admin_address_are_kept(tmp_path):
    ca = tmp_path / "pki" / "ca.pem"
    path = tmp_path / "coordinator.toml"
    path.write_text(
        '[coordinator]\nadmin-address = "coord.example.org:9093"\n'
        f'state-dir = "{tmp_path / "abs-state"}"\n'
        f'[tls]\nca-certificate = "{ca}"\ncertificate = "c.pem"\nprivate-key = "c.key"\n'
    )
    config = CoordinatorConfig.from_toml(path)
    assert config.ca_path == ca
    assert config.state_path == tmp_path / "abs-state"
    assert config.admin_address == "coord.example.org:9093"
    assert config.coordinator.host == "0.0.0.0" and config.coordinator.port == 9093


def test_coordinator_unknown_key_lists_the_known_keys(tmp_path):
    path = tmp_path / "coordinator.toml"
    path.write_text("[coordinator]\nprot = 9093\n" + TLS_TABLE)
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig.from_toml(path)
    message = err.value.message
    assert "coordinator.prot" in message and "unknown key" in message
    for known in (
        "admin-address",
        "host",
        "port",
        "internal-port",
        "nginx",
        "state-dir",
    ):
        assert known in message


def test_coordinator_missing_tls_and_bad_port_are_reported_together(tmp_path):
    path = tmp_path / "coordinator.toml"
    path.write_text("[coordinator]\nport = 70000\n")
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig.from_toml(path)
    assert "2 problem(s)" in err.value.message
    assert "tls" in err.value.message and "coordinator.port" in err.value.message


def test_coordinator_internal_port_must_differ_from_the_public_port(tmp_path):
    path = tmp_path / "coordinator.toml"
    path.write_text("[coordinator]\nport = 9500\ninternal-port = 9500\n" + TLS_TABLE)
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig.from_toml(path)
    assert "internal-port 9500 must differ from port" in err.value.message


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('host = "0.0.0.0:9093"', "coordinator.host: '0.0.0.0:9093' is not an address"),
        ('host = "https://coord.example.org"', "without a scheme or port"),
        ('admin-address = "127.0.0.1"', "coordinator.admin-address: '127.0.0.1': give"),
    ],
)
def test_coordinator_host_and_admin_address_are_checked(tmp_path, line, says):
    path = tmp_path / "coordinator.toml"
    path.write_text(f"[coordinator]\n{line}\n" + TLS_TABLE)
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig.from_toml(path)
    assert says in err.value.message


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "::1", "[::1]", "localhost"])
def test_coordinator_host_takes_addresses_and_names(tmp_path, host):
    path = tmp_path / "coordinator.toml"
    path.write_text(f'[coordinator]\nhost = "{host}"\n' + TLS_TABLE)
    assert CoordinatorConfig.from_toml(path).coordinator.host == host


def test_a_public_address_this_machine_lacks_is_refused_before_start(tmp_path):
    from wardround.server.coordinator import _check_bindable

    # 192.0.2.0/24 is reserved for documentation: no machine has it
    with pytest.raises(
        ConfigError, match=r"'192.0.2.7' \(192.0.2.7\) is not an address"
    ):
        _check_bindable("192.0.2.7", free_port())
    with pytest.raises(ConfigError, match="does not resolve"):
        _check_bindable("no-such-host.invalid", free_port())
    _check_bindable("127.0.0.1", free_port())
    with pytest.raises(ConfigError, match="does not resolve"):
        _check_bindable("a" * 70 + ".example", free_port())  # a label over 63 bytes
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(FederationError, match="already in use on 127.0.0.1"):
            _check_bindable("127.0.0.1", taken.getsockname()[1])


def test_coordinator_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CoordinatorConfig.from_toml(tmp_path / "nope.toml")


# ------------------------------------------------------------------ check_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate from it, and one from another CA."""
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "tls")
    issue_server_certificate(root / "tls", ["localhost"], ["127.0.0.1"], root / "tls")
    init_ca(root / "other-ca")
    issue_server_certificate(
        root / "other-ca", ["localhost"], ["127.0.0.1"], root / "other-ca"
    )
    return root


def _tls_config(pki: Path, tmp_path: Path) -> CoordinatorConfig:
    folder = tmp_path / "coord"
    (folder / "tls").mkdir(parents=True)
    for name in ("ca.pem", "coordinator.pem", "coordinator.key"):
        target = folder / "tls" / name
        target.write_bytes((pki / "tls" / name).read_bytes())
        target.chmod(0o600)
    return _coordinator(folder)


def test_check_tls_passes_on_files_from_the_pki(pki, tmp_path):
    check_tls(_tls_config(pki, tmp_path))


def test_check_tls_refuses_a_certificate_from_another_ca(pki, tmp_path):
    config = _tls_config(pki, tmp_path)
    config.certificate_path.write_bytes(
        (pki / "other-ca" / "coordinator.pem").read_bytes()
    )
    with pytest.raises(ConfigError) as err:
        check_tls(config)
    assert "is not signed by" in err.value.message
    assert "wardround certs server" in err.value.hint


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("ca.pem", "ca-certificate"),
        ("coordinator.pem", "certificate"),
        ("coordinator.key", "private-key"),
    ],
)
def test_check_tls_refuses_a_missing_file(pki, tmp_path, name, what):
    config = _tls_config(pki, tmp_path)
    (tmp_path / "coord" / "tls" / name).unlink()
    with pytest.raises(ConfigError) as err:
        check_tls(config)
    assert err.value.message.startswith(f"[tls] {what} ")
    assert "does not exist" in err.value.message
    assert "wardround certs init" in err.value.hint


def test_check_tls_refuses_a_key_readable_by_others(pki, tmp_path):
    config = _tls_config(pki, tmp_path)
    config.private_key_path.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        check_tls(config)
    assert "readable by other users" in err.value.message
    assert err.value.hint == f"Run `chmod 600 {config.private_key_path}`."


def test_check_tls_refuses_a_certificate_without_the_loopback_address(pki, tmp_path):
    config = _tls_config(pki, tmp_path)
    public_only = tmp_path / "public-only"
    issue_server_certificate(pki / "tls", ["coord.example.org"], [], public_only)
    config.certificate_path.write_bytes((public_only / "coordinator.pem").read_bytes())
    with pytest.raises(ConfigError) as err:
        check_tls(config)
    assert "does not name 127.0.0.1" in err.value.message
    assert "--ip 127.0.0.1" in err.value.hint


def test_check_tls_refuses_an_expired_certificate(pki, tmp_path):
    config = _tls_config(pki, tmp_path)
    old = tmp_path / "old"
    issue_server_certificate(
        pki / "tls",
        ["localhost"],
        [],
        old,
        days=1,
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
    )
    config.certificate_path.write_bytes((old / "coordinator.pem").read_bytes())
    with pytest.raises(ConfigError, match="expired on"):
        check_tls(config)


def _flag(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, flag
    return command[command.index(flag) + 1]


def test_superlink_command_binds_loopback_with_auth_tls_and_an_authenticated_superexec(
    tmp_path,
):
    config = _coordinator(tmp_path / "coord", "port = 9555\ninternal-port = 9556")
    command = superlink_command(config)
    assert Path(command[0]).name == "flower-superlink"
    assert "--enable-supernode-auth" in command
    assert _flag(command, "--ssl-ca-certfile") == str(config.ca_path)
    assert _flag(command, "--ssl-certfile") == str(config.certificate_path)
    assert _flag(command, "--ssl-keyfile") == str(config.private_key_path)
    # sites.json and runs/ are the durable state; the SuperLink's own is in memory
    assert "--database" not in command
    # all of Flower's APIs on loopback only; the public port is nginx's
    assert _flag(command, "--host") == "127.0.0.1"
    assert _flag(command, "--port") == "9556"
    # Flower checks the SuperExec secret only when it does not start its own
    assert _flag(command, "--isolation") == "process"
    secret = _flag(command, "--superexec-auth-secret-file")
    assert secret == str(config.superexec_secret_path)
    assert "--insecure" not in command


def test_superexec_command_signs_with_the_same_secret_on_loopback(tmp_path):
    config = _coordinator(tmp_path / "coord", "internal-port = 9556")
    command = superexec_command(config)
    assert Path(command[0]).name == "flower-superexec"
    assert _flag(command, "--runtime-api-address") == "127.0.0.1:9556"
    assert _flag(command, "--root-certificates") == str(config.ca_path)
    assert _flag(command, "--superexec-auth-secret-file") == str(
        config.superexec_secret_path
    )
    assert "--insecure" not in command


def test_the_superexec_secret_is_private_and_fresh_at_every_start(tmp_path):
    config = _coordinator(tmp_path / "coord")
    config.state_path.mkdir(mode=0o700)
    first = write_superexec_secret(config).read_bytes()
    assert _mode(config.superexec_secret_path) == 0o600
    assert len(first) == 64
    second = write_superexec_secret(config).read_bytes()
    assert second != first
    assert _mode(config.superexec_secret_path) == 0o600


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("other", "is not the private key of"),
        ("garbage", "is not an unencrypted PEM private key"),
    ],
)
def test_check_tls_refuses_a_key_that_is_not_the_certificates(pki, tmp_path, key, says):
    config = _tls_config(pki, tmp_path)
    config.private_key_path.write_bytes(
        (pki / "other-ca" / "coordinator.key").read_bytes()
        if key == "other"
        else b"not a key\n"
    )
    with pytest.raises(ConfigError) as err:
        check_tls(config)
    assert says in err.value.message


def test_check_tls_names_a_folder_given_as_a_file(pki, tmp_path):
    config = _tls_config(pki, tmp_path)
    config.private_key_path.unlink()
    config.private_key_path.mkdir()
    with pytest.raises(ConfigError, match="private-key .* is a folder"):
        check_tls(config)


def test_check_tls_refuses_a_certificate_not_valid_yet(pki, tmp_path):
    config = _tls_config(pki, tmp_path)
    early = tmp_path / "early"
    files = issue_server_certificate(
        pki / "tls",
        ["localhost"],
        ["127.0.0.1"],
        early,
        now=dt.datetime.now(dt.UTC) + dt.timedelta(days=10),
    )
    config.certificate_path.write_bytes(files.cert.read_bytes())
    config.private_key_path.write_bytes(files.key.read_bytes())
    with pytest.raises(ConfigError, match="is valid only from"):
        check_tls(config)


def test_the_public_port_is_checked_by_binding_never_by_connecting_out(
    tmp_path, monkeypatch
):
    import wardround.server.coordinator as coordinator

    dialled: list[tuple[str, int]] = []
    monkeypatch.setattr(
        coordinator, "_listening", lambda host, port: dialled.append((host, port))
    )
    public, internal = free_port(), free_port()
    config = _coordinator(
        tmp_path,
        f'host = "127.0.0.1"\nport = {public}\ninternal-port = {internal}\n'
        "[dashboard]\nenabled = false",
    )
    coordinator._check_ports_free(config)
    assert dialled == [("127.0.0.1", internal)]
