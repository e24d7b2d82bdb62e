"""The coordinator's admin side: coordinator.toml, TLS checks, run launcher, enrolled sites."""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
import tomllib
from pathlib import Path

import pytest

from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError, FederationError
from wardround.ops.audit import read_audit
from wardround.pki import (
    generate_site_keypair,
    init_ca,
    issue_server_certificate,
    public_key_fingerprint,
)
from wardround.server import launcher, registry
from wardround.server.coordinator import (
    check_tls,
    superexec_command,
    superlink_command,
    write_superexec_secret,
)
from wardround.server.coordinator_config import CoordinatorConfig
from wardround.server.launcher import (
    APP_NAME,
    LAUNCH_FILE,
    STATUS_FILE,
    app_pyproject,
    build_app,
    check_deployable,
    find_run,
    follow,
    list_runs,
    mark_stopped,
    new_run_name,
    run_status,
    unfinished_runs,
)
from wardround.server.registry import add_site, list_sites, load_sites, revoke_site

TLS_TABLE = """
[tls]
ca-certificate = "tls/ca.pem"
certificate = "tls/coordinator.pem"
private-key = "tls/coordinator.key"
"""


def _coordinator(folder: Path, extra: str = "") -> CoordinatorConfig:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "coordinator.toml"
    path.write_text(f'[coordinator]\nstate-dir = "state"\n{extra}\n{TLS_TABLE}')
    return CoordinatorConfig.from_toml(path)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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


# ------------------------------------------------------------------- launcher


def test_build_app_is_deterministic_across_calls_and_roots(tiny_config, tmp_path):
    first = build_app(tiny_config, tmp_path / "a")
    again = build_app(tiny_config, tmp_path / "a")
    elsewhere = build_app(tiny_config, tmp_path / "b")
    assert again == first
    assert elsewhere.fab_hash == first.fab_hash
    assert re.fullmatch(r"[0-9a-f]{64}", first.fab_hash)
    assert first.folder.name == APP_NAME
    assert first.folder.parent.parent == tmp_path / "a"
    assert elsewhere.folder.parent.name == first.folder.parent.name
    assert [p.name for p in first.folder.iterdir()] == ["pyproject.toml"]
    assert (first.folder / "pyproject.toml").read_text() == app_pyproject(tiny_config)


def test_build_app_hash_follows_the_settings(tiny_config, tmp_path):
    base = build_app(tiny_config, tmp_path)
    changed = build_app(tiny_config.with_overrides(federation={"rounds": 9}), tmp_path)
    assert changed.fab_hash != base.fab_hash
    assert changed.folder != base.folder
    assert base.folder.is_dir() and changed.folder.is_dir()


@pytest.mark.parametrize(
    "data", [{"synthesize_sites": 2}, {"sites_dir": "/data/sites"}]
)
def test_check_deployable_refuses_simulation_settings(tiny_config, tmp_path, data):
    config = tiny_config.with_overrides(data=data)
    with pytest.raises(ConfigError) as err:
        check_deployable(config)
    assert "simulation settings" in err.value.message
    assert "[data]" in err.value.hint
    with pytest.raises(ConfigError):
        build_app(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_check_deployable_accepts_the_default(tiny_config):
    check_deployable(tiny_config)


@pytest.mark.parametrize("which", ["tiny", "default", "overrides"])
def test_app_pyproject_round_trips_the_run_config(tiny_config, which):
    config = {
        "tiny": tiny_config,
        "default": RunConfig(),
        "overrides": RunConfig().with_overrides(
            federation={"rounds": 3, "strategy": "fedprox", "proximal_mu": 0.01},
            privacy={"enabled": False},
        ),
    }[which]
    text = app_pyproject(config)
    document = tomllib.loads(text)
    app = document["tool"]["flwr"]["app"]
    assert RunConfig.from_flower(app["config"]) == config
    assert app["components"] == {
        "serverapp": "wardround.server.app:app",
        "clientapp": "wardround.client.app:app",
    }
    assert document["project"]["name"] == APP_NAME
    assert re.fullmatch(r"\d+\.\d+\.\d+", document["project"]["version"])


def test_new_run_name_format():
    moment = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert new_run_name("0123456789abcdef" * 4, moment) == "20250102-030405-01234567"
    assert re.fullmatch(r"\d{8}-\d{6}-deadbeef", new_run_name("deadbeef" * 8))


def _make_run(
    coordinator: CoordinatorConfig,
    name: str,
    status: dict | None = None,
    rounds: int = 0,
    flower_ids: tuple[int, ...] = (),
) -> Path:
    run_dir = coordinator.runs_path / name
    run_dir.mkdir(parents=True)
    (run_dir / LAUNCH_FILE).write_text(
        json.dumps(
            {
                "name": name,
                "fab_hash": "f" * 64,
                "launched_at": "2025-01-01T00:00:00+00:00",
                "flower_run_ids": list(flower_ids),
            }
        )
    )
    if status is not None:
        (run_dir / STATUS_FILE).write_text(json.dumps(status))
    if rounds:
        lines = [json.dumps({"round": r}) for r in range(rounds)]
        (run_dir / "rounds.jsonl").write_text("\n".join(lines) + "\n\n")
    return run_dir


def test_run_status_counts_rounds_after_the_baseline(tmp_path):
    coordinator = _coordinator(tmp_path)
    run_dir = _make_run(coordinator, "r1", {"state": "running", "rounds": 5}, rounds=3)
    status = run_status(run_dir)
    assert status == {"state": "running", "rounds": 5, "rounds_done": 2}
    assert run_status(_make_run(coordinator, "r2"))["rounds_done"] == 0
    # a half-written status file reads as empty
    (run_dir / STATUS_FILE).write_text('{"state": "runn')
    assert run_status(run_dir) == {"rounds_done": 2}


@pytest.fixture
def runs(tmp_path) -> CoordinatorConfig:
    coordinator = _coordinator(tmp_path)
    _make_run(
        coordinator,
        "20250101-000000-aaaaaaaa",
        {"state": "finished", "rounds": 2},
        3,
        (1,),
    )
    _make_run(
        coordinator,
        "20250102-000000-bbbbbbbb",
        {"state": "running", "rounds": 4},
        2,
        (2,),
    )
    _make_run(coordinator, "20250102-120000-cccccccc", None, 0, (3, 4))
    _make_run(
        coordinator, "20250103-000000-dddddddd", {"state": "failed", "reason": "boom"}
    )
    (coordinator.runs_path / "not-a-run").mkdir()  # no launch.json: ignored
    return coordinator


def test_list_runs_newest_first_skips_folders_without_launch(runs):
    rows = list_runs(runs)
    assert [r["name"] for r in rows] == [
        "20250103-000000-dddddddd",
        "20250102-120000-cccccccc",
        "20250102-000000-bbbbbbbb",
        "20250101-000000-aaaaaaaa",
    ]
    by_name = {r["name"]: r for r in rows}
    assert by_name["20250101-000000-aaaaaaaa"]["state"] == "finished"
    assert by_name["20250101-000000-aaaaaaaa"]["round"] == 2
    assert by_name["20250102-120000-cccccccc"]["state"] == "starting"
    assert by_name["20250102-120000-cccccccc"]["flower_run_ids"] == [3, 4]
    assert by_name["20250103-000000-dddddddd"]["reason"] == "boom"
    assert by_name["20250102-000000-bbbbbbbb"]["dir"] == str(
        runs.runs_path / "20250102-000000-bbbbbbbb"
    )


def test_list_runs_without_a_runs_folder_is_empty(tmp_path):
    assert list_runs(_coordinator(tmp_path)) == []
    assert unfinished_runs(_coordinator(tmp_path)) == []


def test_find_run_by_name_or_unique_prefix(runs):
    exact = find_run(runs, "20250101-000000-aaaaaaaa")
    assert exact == runs.runs_path / "20250101-000000-aaaaaaaa"
    assert find_run(runs, "20250101") == exact
    assert find_run(runs, "20250102-12") == runs.runs_path / "20250102-120000-cccccccc"


def test_find_run_refuses_ambiguous_and_unknown_names(runs):
    with pytest.raises(ConfigError) as err:
        find_run(runs, "20250102")
    assert "several runs" in err.value.message
    assert "20250103-000000-dddddddd" in err.value.message  # lists recent runs
    with pytest.raises(ConfigError, match="no run named 'zzz'"):
        find_run(runs, "zzz")
    with pytest.raises(ConfigError, match="no run"):
        find_run(runs, "not-a-run")  # a folder, but never launched


def test_mark_stopped_keeps_the_status_and_ends_the_run(runs):
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"
    before = {p.name for p in unfinished_runs(runs)}
    assert before == {"20250102-000000-bbbbbbbb", "20250102-120000-cccccccc"}
    mark_stopped(run_dir, "stopped by the coordinator admin")
    status = json.loads((run_dir / STATUS_FILE).read_text())
    assert status["state"] == "stopped"
    assert status["reason"] == "stopped by the coordinator admin"
    assert status["rounds"] == 4  # what the ServerApp wrote stays
    assert "updated" in status
    assert [p.name for p in unfinished_runs(runs)] == ["20250102-120000-cccccccc"]
    # a run that never wrote a status can be stopped too
    mark_stopped(runs.runs_path / "20250102-120000-cccccccc", "admin")
    assert unfinished_runs(runs) == []


def test_follow_returns_at_once_on_a_finished_run(runs, monkeypatch):
    def no_flower(*_args, **_kwargs):
        raise AssertionError("a finished run needs no flwr call")

    monkeypatch.setattr(launcher, "flower_status", no_flower)
    seen: list[dict] = []
    result = follow(
        runs,
        runs.runs_path / "20250101-000000-aaaaaaaa",
        seen.append,
        poll_s=0.001,
        flower_poll_s=0.0,
    )
    assert result.state == "finished" and result.reason == ""
    assert result.status["rounds_done"] == 2
    assert len(seen) == 1 and seen[0]["state"] == "finished"


def test_follow_reports_a_serverapp_that_died_without_status(runs, monkeypatch):
    calls: list[int] = []

    def flower_status(coordinator, flower_run_id):
        calls.append(flower_run_id)
        if len(calls) < 3:
            return {"status": "running"}
        return {"status": "finished:failed", "status-details": "ServerApp crashed"}

    monkeypatch.setattr(launcher, "flower_status", flower_status)
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"
    progress: list[dict] = []
    result = follow(runs, run_dir, progress.append, poll_s=0.001, flower_poll_s=0.0)
    assert result.state == "failed"
    assert result.reason == "Flower: ServerApp crashed"
    assert result.status["state"] == "running"  # status.json stayed as it was
    assert calls == [2, 2, 2]  # the newest Flower run id of the run
    assert len(progress) >= 3


def test_follow_prefers_the_serverapps_last_status(runs, monkeypatch):
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"

    def flower_status(coordinator, flower_run_id):
        # the ServerApp wrote its final status just before it exited
        (run_dir / STATUS_FILE).write_text(
            json.dumps({"state": "finished", "rounds": 4})
        )
        return {"status": "finished:completed"}

    monkeypatch.setattr(launcher, "flower_status", flower_status)
    result = follow(runs, run_dir, lambda _s: None, poll_s=0.001, flower_poll_s=0.0)
    assert result.state == "finished"


def test_follow_keeps_going_while_the_coordinator_restarts(runs, monkeypatch):
    run_dir = runs.runs_path / "20250102-000000-bbbbbbbb"
    calls = []

    def flower_status(coordinator, flower_run_id):
        calls.append(flower_run_id)
        raise FederationError("`flwr ls` failed: Connection refused")

    def on_progress(status):
        if len(calls) >= 2:
            (run_dir / STATUS_FILE).write_text(
                json.dumps({"state": "failed", "reason": "site refused"})
            )

    monkeypatch.setattr(launcher, "flower_status", flower_status)
    result = follow(runs, run_dir, on_progress, poll_s=0.001, flower_poll_s=0.0)
    assert result.state == "failed" and result.reason == "site refused"
    assert len(calls) >= 2


# ------------------------------------------------------------------ registry


class FakeFlwr:
    """Stands in for ``flwr_json``: records each call, answers like ``flwr``."""

    def __init__(self, nodes: list[dict] | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.nodes = nodes or []
        self.down = False

    def __call__(self, config, *args: str, **_kwargs) -> dict:
        assert isinstance(config, CoordinatorConfig)
        self.calls.append(args)
        if self.down:
            raise FederationError("`flwr supernode list` failed: Connection refused")
        if args[:2] == ("supernode", "register"):
            return {"success": True, "node-id": 42}
        if args[:2] == ("supernode", "list"):
            return {"success": True, "nodes": self.nodes}
        return {"success": True}


@pytest.fixture
def flwr(monkeypatch) -> FakeFlwr:
    fake = FakeFlwr()
    monkeypatch.setattr(registry, "flwr_json", fake)
    return fake


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site-keys")
    for name in ("st-marys", "general", "third"):
        generate_site_keypair(name, folder)
    return folder


def test_add_site_registers_records_and_audits(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    pub = keys / "st-marys.pub"
    site = add_site(config, "st-marys", pub)
    assert flwr.calls == [("supernode", "register", str(pub))]
    assert site.node_id == 42 and site.active
    assert site.public_key_sha256 == public_key_fingerprint(pub)
    assert _mode(config.sites_path) == 0o600
    assert load_sites(config.sites_path) == {"st-marys": site}
    raw = json.loads(config.sites_path.read_text())["sites"]["st-marys"]
    assert raw["node_id"] == 42 and raw["revoked_at"] is None
    events = read_audit(config.audit_path)
    assert [e["event"] for e in events] == ["site_enrolled"]
    assert events[0]["site"] == "st-marys"
    assert events[0]["node_id"] == "42"
    assert events[0]["key_sha256"] == site.public_key_sha256
    assert events[0]["actor"] == "coordinator"


def test_add_site_refuses_a_second_active_enrolment_of_a_name(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    add_site(config, "st-marys", keys / "st-marys.pub")
    with pytest.raises(ConfigError) as err:
        add_site(config, "st-marys", keys / "general.pub")
    assert "already enrolled (node 42)" in err.value.message
    assert "wardround sites revoke st-marys" in err.value.hint
    assert len(flwr.calls) == 1  # the SuperLink was not asked
    assert len(read_audit(config.audit_path)) == 1


def test_add_site_refuses_the_same_key_under_another_name(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    add_site(config, "st-marys", keys / "st-marys.pub")
    with pytest.raises(ConfigError) as err:
        add_site(config, "general", keys / "st-marys.pub")
    assert "already enrolled as site 'st-marys'" in err.value.message
    assert len(flwr.calls) == 1
    assert set(load_sites(config.sites_path)) == {"st-marys"}


@pytest.mark.parametrize("which", ["private-key", "pem", "text"])
def test_add_site_refuses_a_file_that_is_not_an_openssh_public_key(
    tmp_path, flwr, keys, pki, which
):
    config = _coordinator(tmp_path)
    source = {
        "private-key": keys / "st-marys.key",
        "pem": pki / "tls" / "ca.pem",
        "text": None,
    }[which]
    wrong = tmp_path / "site.pub"
    if source is None:
        wrong.write_text("ssh-ed25519 not-base64!!\n")
    else:
        wrong.write_bytes(source.read_bytes())
    with pytest.raises(ConfigError) as err:
        add_site(config, "st-marys", wrong)
    assert err.value.message == f"{wrong} is not an OpenSSH public key"
    assert "wardround keys site" in err.value.hint
    assert flwr.calls == []
    assert not config.sites_path.exists()


def test_add_site_refuses_a_missing_key_and_a_bad_name(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        add_site(config, "st-marys", tmp_path / "absent.pub")
    with pytest.raises(ConfigError):
        add_site(config, "../etc", keys / "st-marys.pub")
    assert flwr.calls == []


def test_revoke_site_unregisters_the_node_once(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    add_site(config, "st-marys", keys / "st-marys.pub")
    revoked = revoke_site(config, "st-marys")
    assert flwr.calls[-1] == ("supernode", "unregister", "42")
    assert not revoked.active and revoked.revoked_at
    assert load_sites(config.sites_path)["st-marys"] == revoked
    assert _mode(config.sites_path) == 0o600
    events = read_audit(config.audit_path)
    assert [e["event"] for e in events] == ["site_enrolled", "site_revoked"]
    assert events[1]["site"] == "st-marys" and events[1]["node_id"] == "42"

    calls = len(flwr.calls)
    with pytest.raises(ConfigError, match="already revoked"):
        revoke_site(config, "st-marys")
    with pytest.raises(
        ConfigError, match=r"no enrolled site 'nope' \(enrolled: st-marys\)"
    ):
        revoke_site(config, "nope")
    assert len(flwr.calls) == calls
    # the revoked site may enrol again, with a new key
    again = add_site(config, "st-marys", keys / "general.pub")
    assert again.active


def test_list_sites_shows_revoked_and_the_superlinks_view(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    add_site(config, "st-marys", keys / "st-marys.pub")
    add_site(config, "general", keys / "general.pub")
    revoke_site(config, "general")
    flwr.nodes = [
        {"node-id": 42, "status": "online", "online-at": "2025-01-01T00:00:00"}
    ]
    rows = {r["site"]: r for r in list_sites(config)}
    assert rows["general"]["state"] == "revoked"
    assert rows["general"]["revoked_at"]
    assert rows["st-marys"]["state"] == "online"
    assert rows["st-marys"]["online_at"] == "2025-01-01T00:00:00"
    assert rows["st-marys"]["node_id"] == "42"

    flwr.nodes = []
    assert {r["site"]: r["state"] for r in list_sites(config)} == {
        "general": "revoked",
        "st-marys": "unknown",
    }


def test_list_sites_when_the_coordinator_is_down(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    add_site(config, "st-marys", keys / "st-marys.pub")
    flwr.down = True
    rows = list_sites(config)
    assert [(r["site"], r["state"], r["online_at"]) for r in rows] == [
        ("st-marys", "coordinator down", "N/A")
    ]


def test_list_sites_before_any_enrolment_is_empty(tmp_path, flwr):
    assert list_sites(_coordinator(tmp_path)) == []


def test_a_restarted_coordinator_registers_active_keys_again_not_revoked_ones(
    tmp_path, flwr, keys
):
    config = _coordinator(tmp_path)
    add_site(config, "st-marys", keys / "st-marys.pub")
    add_site(config, "general", keys / "general.pub")
    revoke_site(config, "general")
    flwr.calls.clear()
    registered_keys: list[str] = []

    def register(config_, *args, **_kw):
        registered_keys.append(Path(args[2]).read_text().strip())
        return {"success": True, "node-id": 77}

    flwr_calls = registry.flwr_json
    registry.flwr_json = register
    try:
        assert registry.reenrol_sites(config) == ["st-marys"]
    finally:
        registry.flwr_json = flwr_calls
    assert registered_keys == [(keys / "st-marys.pub").read_text().strip()]
    sites = load_sites(config.sites_path)
    assert sites["st-marys"].node_id == 77  # the new SuperLink's id
    assert not sites["general"].active
