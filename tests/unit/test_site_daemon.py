"""The site daemon: deployment checks, the SuperNode command, refusals, supervision,
the SuperExec secret. The worker and its audit observer: test_site_worker.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# plan_site imports the site checks (torch, pydicom): import them at collection, so
# the tests below time only their own work
import wardround.client.site_check  # noqa: F401
from wardround.client.daemon import (
    SitePlan,
    plan_site,
    refusal_in,
    supernode_command,
)
from wardround.common.errors import ConfigError, FederationError
from wardround.ops.audit import read_audit
from wardround.pki import generate_site_keypair, init_ca
from wardround.sitedata.site_config import SiteConfig

# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("log_text", "message_part", "hint_part"),
    [
        (
            "grpc: ssl_transport_security.cc: CERTIFICATE_VERIFY_FAILED: "
            "self signed certificate in certificate chain\n",
            "TLS: the coordinator's certificate is not signed",
            "deployment.root-certificate",
        ),
        (
            "INFO : Starting Flower SuperNode\n"
            "ERROR : Failed to activate SuperNode: PERMISSION_DENIED\n",
            "the coordinator refused this site's key",
            "wardround sites add NAME --key NAME.pub",
        ),
    ],
)
def test_refusal_in_maps_the_log_markers(log_text, message_part, hint_part):
    error = refusal_in(log_text)
    assert isinstance(error, FederationError)
    assert message_part in error.message
    assert hint_part in error.hint


@pytest.mark.parametrize(
    "log_text",
    [
        "",
        "INFO : Starting Flower SuperNode\nINFO : connected\n",
        "certificate verify failed",
    ],
)
def test_refusal_in_is_none_for_other_logs(log_text):
    assert refusal_in(log_text) is None


# ------------------------------------------------------------------ plan_site


@pytest.fixture
def site(synthetic_sites, tmp_path) -> Path:
    """A private copy of a synthetic site; returns its site.toml."""
    folder = tmp_path / "site"
    shutil.copytree(synthetic_sites / "site-01", folder)
    return folder / "site.toml"


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> tuple[Path, Path]:
    """The federation's CA certificate and a site key (0600)."""
    root = tmp_path_factory.mktemp("site-credentials")
    ca = init_ca(root / "ca")
    keys = generate_site_keypair("site-01", root / "keys")
    return ca.cert, keys.private_key


def _deploy(site_toml: Path, **values: str) -> None:
    lines = "".join(f'{key} = "{value}"\n' for key, value in values.items())
    site_toml.write_text(site_toml.read_text() + f"\n[deployment]\n{lines}")


def _local_copy(source: Path, target: Path, mode: int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    target.chmod(mode)
    return target


def test_plan_site_refuses_a_site_without_deployment(site):
    with pytest.raises(ConfigError) as err:
        plan_site(site)
    assert (
        "[deployment] lacks coordinator, root-certificate, private-key"
        in err.value.message
    )
    assert str(site.resolve()) in err.value.message
    assert "root-certificate" in err.value.hint


def test_plan_site_names_only_the_missing_keys(site, credentials):
    _deploy(
        site,
        coordinator="coord.example.org:9093",
        **{"root-certificate": str(credentials[0])},
    )
    with pytest.raises(ConfigError) as err:
        plan_site(site)
    assert err.value.message.endswith("[deployment] lacks private-key")


def test_plan_site_refuses_a_missing_certificate(site, credentials):
    _deploy(
        site,
        coordinator="coord.example.org:9093",
        **{"root-certificate": "certs/ca.pem", "private-key": str(credentials[1])},
    )
    with pytest.raises(ConfigError) as err:
        plan_site(site)
    assert "deployment.root-certificate" in err.value.message
    assert "does not exist" in err.value.message


def test_plan_site_refuses_a_private_key_readable_by_others(site, credentials):
    key = _local_copy(credentials[1], site.parent / "keys" / "site-01.key", 0o640)
    _deploy(
        site,
        coordinator="coord.example.org:9093",
        **{"root-certificate": str(credentials[0]), "private-key": "keys/site-01.key"},
    )
    with pytest.raises(ConfigError) as err:
        plan_site(site)
    assert "readable by other users" in err.value.message
    assert "chmod 600" in err.value.hint
    assert str(key) in err.value.hint


def test_plan_site_passes_and_resolves_absolute_paths(
    site, credentials, monkeypatch, tmp_path
):
    _local_copy(credentials[0], site.parent / "certs" / "ca.pem", 0o644)
    _local_copy(credentials[1], site.parent / "keys" / "site-01.key", 0o600)
    _deploy(
        site,
        coordinator="coord.example.org:9093",
        **{"root-certificate": "certs/ca.pem", "private-key": "keys/site-01.key"},
    )
    monkeypatch.chdir(tmp_path)
    plan = plan_site(Path("site") / "site.toml")
    assert plan.coordinator == "coord.example.org:9093"
    assert plan.site_toml == site.resolve() and plan.site_toml.is_absolute()
    for path in (plan.root_certificate, plan.private_key, plan.state_dir):
        assert path.is_absolute()
    assert (
        plan.root_certificate.resolve() == (site.parent / "certs" / "ca.pem").resolve()
    )
    assert (
        plan.private_key.resolve() == (site.parent / "keys" / "site-01.key").resolve()
    )
    assert plan.state_dir == (site.parent / ".wardround-site").resolve()
    assert plan.site.site.name == "site-01"


def test_plan_site_accepts_a_site_without_imaging(site, credentials):
    # the daemon does not know its runs yet: a run that requires images is
    # refused when it comes (sitedata.imaging), not the site
    import tomllib

    import tomli_w

    doc = tomllib.loads(site.read_text())
    del doc["data"]["dicom-dirs"]
    site.write_text(tomli_w.dumps(doc))
    shutil.rmtree(site.parent / "dicom")
    _deploy(
        site,
        coordinator="coord.example.org:9093",
        **{"root-certificate": str(credentials[0]), "private-key": str(credentials[1])},
    )

    plan = plan_site(site)

    assert not plan.site.has_imaging


def test_supernode_command_runs_the_paced_supernode(site):
    config = SiteConfig.from_toml(site)
    plan = SitePlan(
        site=config,
        site_toml=site.resolve(),
        coordinator="coord.example.org:9093",
        root_certificate=Path("/etc/wardround/ca.pem"),
        private_key=Path("/etc/wardround/site-01.key"),
        state_dir=site.parent / ".wardround-site",
    )
    command = supernode_command(plan, 45123, None)
    assert command[:3] == [sys.executable, "-m", "wardround.client.supernode_main"]

    def value(flag: str) -> str:
        assert command.count(flag) == 1
        return command[command.index(flag) + 1]

    assert value("--isolation") == "process"
    assert value("--host") == "127.0.0.1"
    assert value("--port") == "45123"
    assert value("--superlink") == "coord.example.org:9093"
    assert value("--root-certificates") == "/etc/wardround/ca.pem"
    assert value("--auth-supernode-private-key") == "/etc/wardround/site-01.key"
    assert value("--node-config") == f"site-config='{site.resolve()}'"
    assert "--insecure" not in command


def test_supernode_node_config_parses_back_to_site_toml(site):
    from wardround.client.runtime import SITE_CONFIG_KEY
    from wardround.flower_compat.tools import parse_config_args

    plan = SitePlan(
        site=SiteConfig.from_toml(site),
        site_toml=site.resolve(),
        coordinator="c:1",
        root_certificate=Path("/ca.pem"),
        private_key=Path("/k"),
        state_dir=Path("/s"),
    )
    command = supernode_command(plan, 1, None)
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    assert node_config == {SITE_CONFIG_KEY: str(site.resolve())}


# ------------------------------------------------------------------ supervision


class _IdleWorker:
    """Stands in for the warm worker: these tests are about the SuperNode process."""

    tasks_run = 0
    secrets: list[bytes | None] = []

    def __init__(
        self,
        *args: object,
        superexec_secret: bytes | None = None,
        runtime_ca_pem: bytes | None = None,
    ) -> None:
        _IdleWorker.secrets.append(superexec_secret)
        assert runtime_ca_pem is not None  # the daemon's worker always checks TLS

    def serve(self, stop) -> None:  # noqa: ANN001 - a threading.Event
        stop.wait()


def _supervised_plan(
    site, credentials, monkeypatch, node_script: str, args=lambda port, tls: []
) -> SitePlan:
    """The site's plan, its SuperNode replaced by ``node_script`` run with ``args``."""
    import wardround.client.daemon as daemon

    _local_copy(credentials[0], site.parent / "ca.pem", 0o644)
    _local_copy(credentials[1], site.parent / "site-01.key", 0o600)
    _deploy(
        site,
        coordinator="127.0.0.1:9",
        **{"root-certificate": "ca.pem", "private-key": "site-01.key"},
    )
    monkeypatch.setattr(daemon, "SiteWorker", _IdleWorker)
    monkeypatch.setattr(daemon, "_MAX_RESTART_DELAY_S", 0.01)
    monkeypatch.setattr(
        daemon,
        "supernode_command",
        lambda plan, port, tls: [sys.executable, "-c", node_script, *args(port, tls)],
    )
    return plan_site(site)


def test_a_supernode_that_ends_itself_is_started_again(site, credentials, monkeypatch):
    import threading
    import time

    from wardround.client.daemon import run_site_daemon

    marker = site.parent / "first-run-done"
    # first run: ends at once, as Flower's SuperNode does on a 401 from a restarted
    # SuperLink; second run: stays up
    script = (
        "import pathlib, sys, time\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n    m.touch(); sys.exit(0)\n"
        "time.sleep(120)\n"
    )
    plan = _supervised_plan(site, credentials, monkeypatch, script)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_site_daemon(plan, stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    audit = plan.state_dir / "audit.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        audit.exists()
        and "supernode_restarted" in [e["event"] for e in read_audit(audit)]
    ):
        time.sleep(0.2)
    time.sleep(1.5)  # the second SuperNode stays up
    assert thread.is_alive(), errors
    stop.set()
    thread.join(timeout=60)
    assert not errors
    events = [e for e in read_audit(audit)]
    restarted = [e for e in events if e["event"] == "supernode_restarted"]
    assert len(restarted) == 1 and restarted[0]["exit_code"] == 0
    assert events[-1]["event"] == "site_daemon_stopped"
    assert events[-1]["reason"] == "stopped"


class _FollowingWorker(_IdleWorker):
    """Keeps the address it was given, and whatever the daemon moves it to."""

    made: list[_FollowingWorker] = []

    def __init__(self, address: str, *args: object, **kwargs: object) -> None:
        super().__init__(address, *args, **kwargs)
        self.runtime_api_address = address
        _FollowingWorker.made.append(self)


_HOLDER = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('bound', flush=True); time.sleep(300)\n"
)


def test_a_supernode_whose_port_another_process_took_moves_and_the_worker_follows(
    site, credentials, monkeypatch, tmp_path
):
    import subprocess
    import threading
    import time

    import wardround.client.daemon as daemon

    ports_file, holder_pid = tmp_path / "ports", tmp_path / "holder.pid"
    # Run 1 notes its port, leaves a process listening there (as another account
    # would bind it once the SuperNode is gone) and ends; run 2 notes its port.
    script = (
        "import os, pathlib, subprocess, sys, time\n"
        "pathlib.Path(sys.argv[3] + '.env').write_text(os.environ['no_proxy'])\n"
        "ports = pathlib.Path(sys.argv[2])\n"
        "seen = ports.read_text().split() if ports.exists() else []\n"
        "ports.write_text(' '.join([*seen, sys.argv[1]]))\n"
        "if not seen:\n"
        f"    h = subprocess.Popen([sys.executable, '-c', {_HOLDER!r}, sys.argv[1]], "
        "stdout=subprocess.PIPE, text=True)\n"
        "    h.stdout.readline(); pathlib.Path(sys.argv[3]).write_text(str(h.pid))\n"
        "    sys.exit(0)\n"
        "time.sleep(120)\n"
    )
    plan = _supervised_plan(
        site,
        credentials,
        monkeypatch,
        script,
        lambda port, tls: [str(port), str(ports_file), str(holder_pid)],
    )
    monkeypatch.setattr(daemon, "SiteWorker", _FollowingWorker)
    _FollowingWorker.made.clear()
    monkeypatch.setenv("no_proxy", "pacs.hospital.local")
    environ_before = dict(os.environ)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run_site_daemon(plan, stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not ports_file.exists() or len(ports_file.read_text().split()) < 2
        ):
            time.sleep(0.1)
        time.sleep(0.5)
        assert thread.is_alive(), errors
    finally:
        stop.set()
        thread.join(timeout=60)
        if holder_pid.exists():
            pid = int(holder_pid.read_text())
            os.kill(pid, 15)
            gone_by = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < gone_by:
                time.sleep(0.05)  # its port is bound again below
    assert not errors
    assert dict(os.environ) == environ_before  # the daemon's changes are undone
    # the SuperNode (and the worker) bypass the host's proxy for loopback
    no_proxy = Path(str(holder_pid) + ".env").read_text().split(",")
    assert {"pacs.hospital.local", "127.0.0.1", "localhost"} <= set(no_proxy)
    held, moved_to = map(int, ports_file.read_text().split())
    assert moved_to != held
    (worker,) = _FollowingWorker.made
    assert worker.runtime_api_address == f"127.0.0.1:{moved_to}"
    events = read_audit(plan.state_dir / "audit.jsonl")
    (moved,) = [e for e in events if e["event"] == "runtime_port_moved"]
    assert (moved["held_port"], moved["port"]) == (held, moved_to)

    # a fixed runtime-port does not move: the daemon stops and names the holder
    subprocess_holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(held)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert subprocess_holder.stdout.readline().strip() == "bound"
        site.write_text(site.read_text() + f"runtime-port = {held}\n")
        fixed = daemon.plan_site(site)
        monkeypatch.setattr(
            daemon,
            "supernode_command",
            lambda plan, port, tls: [sys.executable, "-c", "import sys; sys.exit(1)"],
        )
        with pytest.raises(FederationError, match="another process holds it") as err:
            daemon.run_site_daemon(fixed, threading.Event())
        assert f"sport = :{held}" in err.value.hint
    finally:
        subprocess_holder.terminate()
        subprocess_holder.wait(timeout=10)


def test_a_supernode_that_keeps_ending_fails_the_daemon(site, credentials, monkeypatch):
    import threading

    import wardround.client.daemon as daemon

    plan = _supervised_plan(site, credentials, monkeypatch, "import sys; sys.exit(3)")
    with pytest.raises(FederationError, match="exited with code 3, 6 times in a row"):
        daemon.run_site_daemon(plan, threading.Event())
    restarted = [
        e
        for e in read_audit(plan.state_dir / "audit.jsonl")
        if e["event"] == "supernode_restarted"
    ]
    assert len(restarted) == daemon._MAX_QUICK_EXITS


# ------------------------------------------------------------------ Runtime API auth


def test_the_daemon_makes_one_private_superexec_secret_and_never_logs_it(
    site, credentials, monkeypatch
):
    import threading

    import wardround.client.daemon as daemon

    _IdleWorker.secrets.clear()
    plan = _supervised_plan(site, credentials, monkeypatch, "import sys; sys.exit(3)")
    for _ in range(2):  # a restarted daemon keeps the secret it made
        with pytest.raises(FederationError):
            daemon.run_site_daemon(plan, threading.Event())
    secret_file = plan.state_dir / daemon.SUPEREXEC_SECRET_FILE
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_bytes()
    assert len(secret) == 64 and int(secret, 16) > 0
    assert _IdleWorker.secrets == [secret, secret]
    command = supernode_command(plan, 1, None)
    flag = command.index("--superexec-auth-secret-file")
    assert command[flag + 1] == str(secret_file)
    for written in plan.state_dir.rglob("*"):
        if written.is_file() and written != secret_file:
            assert secret not in written.read_bytes(), written


@pytest.fixture
def secured_supernode(site, credentials, monkeypatch, tmp_path):
    """The daemon's own SuperNode command, run for real: its Runtime API on 127.0.0.1.

    No coordinator listens at ``deployment.coordinator``: the SuperNode keeps trying
    to connect while its local Runtime API already answers.
    """
    from wardround.client.daemon import (
        SUPEREXEC_SECRET_FILE,
        _wait_for_port,
        free_loopback_port,
    )
    from wardround.client.runtime_tls import issue_runtime_tls
    from wardround.ops.processes import start_child, stop_child
    from wardround.ops.secret_file import load_or_create_secret

    _local_copy(credentials[0], site.parent / "ca.pem", 0o644)
    _local_copy(credentials[1], site.parent / "site-01.key", 0o600)
    _deploy(
        site,
        coordinator=f"127.0.0.1:{free_loopback_port()}",
        **{"root-certificate": "ca.pem", "private-key": "site-01.key"},
    )
    plan = plan_site(site)
    secret = load_or_create_secret(plan.state_dir / SUPEREXEC_SECRET_FILE, "secret")
    port = free_loopback_port()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    tls = issue_runtime_tls(plan.state_dir)
    node = start_child(
        supernode_command(plan, port, tls),
        dict(os.environ),
        tmp_path / "supernode.log",
    )
    try:
        _wait_for_port(port, node, tls)
        assert node.poll() is None, (tmp_path / "supernode.log").read_text()
        yield f"127.0.0.1:{port}", secret, tls
    finally:
        stop_child(node)


def _acquire_task(address: str, ca_pem: bytes, *interceptors: object):  # noqa: ANN202
    """One AcquireTask call, the way any local process could make it (no retries)."""
    from wardround.flower_compat.runtime import (
        AcquireTaskRequest,
        RuntimeHttpClient,
        RuntimeVersionHttpInterceptor,
        TaskType,
    )

    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=False,
        root_certificates=ca_pem,
        interceptors=[RuntimeVersionHttpInterceptor("SuperExec"), *interceptors],
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    try:
        return client.AcquireTask(request)
    finally:
        client.close()


def test_acquire_task_without_the_site_secret_is_refused(secured_supernode):
    import httpx

    from wardround.client.site_worker import SUPEREXEC_AUTH_METHODS
    from wardround.flower_compat.runtime import SuperExecAuthHttpInterceptor

    address, secret, tls = secured_supernode
    wrong = SuperExecAuthHttpInterceptor(
        master_secret=b"f" * 64, protected_methods=SUPEREXEC_AUTH_METHODS
    )
    for interceptors in ((), (wrong,)):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            _acquire_task(address, tls.ca_pem, *interceptors)
        assert refused.value.response.status_code == 401
    right = SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods=SUPEREXEC_AUTH_METHODS
    )
    assert not _acquire_task(address, tls.ca_pem, right).HasField("task")


def test_the_worker_signs_its_acquire_task_with_the_site_secret(secured_supernode):
    import threading

    from wardround.client.approvals import AppApprovals
    from wardround.client.site_worker import SiteWorker
    from wardround.flower_compat.runtime import AcquireTaskRequest

    address, secret, tls = secured_supernode
    worker = SiteWorker(
        address,
        AppApprovals(Path("/nonexistent")),
        superexec_secret=secret,
        runtime_ca_pem=tls.ca_pem,
    )
    acquirer = worker._runtime_client(component="SuperExec")
    try:
        assert not acquirer.AcquireTask(AcquireTaskRequest()).HasField("task")
    finally:
        acquirer.close()
    # a worker with a stale secret is refused, and its call gives up instead of
    # Flower's SuperExec reaction (SIGINT to its own process: the site daemon)
    stale = SiteWorker(
        address,
        AppApprovals(Path("/nonexistent")),
        superexec_secret=b"0",
        runtime_ca_pem=tls.ca_pem,
    )
    acquirer = stale._runtime_client(component="SuperExec")
    try:
        with pytest.raises(Exception) as refused:
            acquirer.AcquireTask(AcquireTaskRequest())
        assert refused.value.response.status_code == 401
    finally:
        acquirer.close()
    assert threading.main_thread().is_alive()


def test_the_workers_calls_to_its_supernode_never_go_through_the_hosts_proxy(
    secured_supernode, monkeypatch
):
    # a hospital sets https_proxy for its outbound traffic; httpx would send the
    # worker's https://127.0.0.1 calls to that proxy
    import httpx

    from wardround.client.approvals import AppApprovals
    from wardround.client.runtime_tls import bypass_proxy_for_loopback
    from wardround.client.site_worker import SUPEREXEC_AUTH_METHODS, SiteWorker
    from wardround.flower_compat.runtime import (
        AcquireTaskRequest,
        SuperExecAuthHttpInterceptor,
    )

    address, secret, tls = secured_supernode
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "intranet.example")
    monkeypatch.setenv("no_proxy", "pacs.hospital.local")
    worker = SiteWorker(
        address,
        AppApprovals(Path("/nonexistent")),
        superexec_secret=secret,
        runtime_ca_pem=tls.ca_pem,
    )

    def acquire():  # noqa: ANN202
        client = worker._runtime_client(component="SuperExec")
        try:
            return client.AcquireTask(AcquireTaskRequest())
        finally:
            client.close()

    signed = SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods=SUPEREXEC_AUTH_METHODS
    )
    # the SuperNode listens: a refused connection is the call going to the proxy
    with pytest.raises(httpx.ConnectError, match="refused"):
        _acquire_task(address, tls.ca_pem, signed)  # one call, no retries
    bypass_proxy_for_loopback(os.environ)
    # the operator's entries of either name stay, under both names
    listed = "intranet.example,pacs.hospital.local,127.0.0.1,localhost"
    assert os.environ["NO_PROXY"] == os.environ["no_proxy"] == listed
    assert not _acquire_task(address, tls.ca_pem, signed).HasField("task")
    assert not acquire().HasField("task")  # the worker's own client


def test_the_runtime_api_is_served_with_this_starts_certificate_alone(
    secured_supernode, tmp_path
):
    """Another local account listening on the port cannot pass for the SuperNode."""
    import socket
    import ssl
    import threading
    import time

    import httpx

    from wardround.client.approvals import AppApprovals
    from wardround.client.daemon import _port_taken, _wait_for_port, free_loopback_port
    from wardround.client.runtime_tls import issue_runtime_tls, serves_runtime_tls
    from wardround.client.site_worker import SiteWorker, _is_tls_failure
    from wardround.flower_compat.runtime import AcquireTaskRequest

    address, secret, tls = secured_supernode
    port = int(address.rsplit(":", 1)[1])
    assert serves_runtime_tls(port, tls)
    for name in ("ca.pem", "runtime.pem", "runtime.key"):
        assert (tls.private_key.parent / name).stat().st_mode & 0o777 == 0o600
    assert tls.private_key.parent.stat().st_mode & 0o777 == 0o700
    # in plain HTTP the SuperNode does not answer at all
    with pytest.raises(httpx.HTTPError):
        _acquire_task_plain(address)

    # a squatter on another port with a certificate of its own making (the same
    # names, 127.0.0.1), as another account would run while the SuperNode restarts
    own = issue_runtime_tls(tmp_path / "squatter")
    squat_port = free_loopback_port()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(own.certificate, own.private_key)
    listener = socket.create_server(("127.0.0.1", squat_port))
    served: list[bytes] = []

    def squat() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls_conn:
                    served.append(tls_conn.recv(1024))
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=squat, daemon=True)
    thread.start()
    try:
        assert _port_taken(squat_port)
        assert not serves_runtime_tls(squat_port, tls)

        class _Running:
            def poll(self) -> None:
                return None

        started = time.monotonic()
        _wait_for_port(squat_port, _Running(), tls, limit_s=1.5)
        assert time.monotonic() - started >= 1.4  # never taken for the SuperNode
        worker = SiteWorker(
            f"127.0.0.1:{squat_port}",
            AppApprovals(Path("/nonexistent")),
            superexec_secret=secret,
            runtime_ca_pem=tls.ca_pem,
        )
        acquirer = worker._runtime_client(component="SuperExec")
        try:
            with pytest.raises(httpx.ConnectError) as refused:
                acquirer.AcquireTask(AcquireTaskRequest())
            assert _is_tls_failure(refused.value)
        finally:
            acquirer.close()
        assert served == []  # not one byte of a request reached the squatter
    finally:
        listener.close()
        thread.join(timeout=5)


def _acquire_task_plain(address: str):  # noqa: ANN202
    from wardround.flower_compat.runtime import (
        AcquireTaskRequest,
        RuntimeHttpClient,
        RuntimeVersionHttpInterceptor,
    )

    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor("SuperExec")],
    )
    try:
        return client.AcquireTask(AcquireTaskRequest())
    finally:
        client.close()


@pytest.mark.parametrize(
    ("key_file", "says"),
    [
        ("public", "is a public key"),
        ("pem", "is a PEM private key, not an OpenSSH one"),
        ("folder", "is a folder"),
    ],
)
def test_plan_site_names_a_key_the_supernode_cannot_use(
    site, credentials, tmp_path, key_file, says
):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    target = site.parent / "keys" / "site-01.key"
    target.parent.mkdir(exist_ok=True)
    if key_file == "public":
        _local_copy(credentials[1].with_suffix(".pub"), target, 0o600)
    elif key_file == "pem":
        pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        target.write_bytes(pem)
        target.chmod(0o600)
    else:
        target.mkdir()
    _deploy(
        site,
        coordinator="coord.example.org:9093",
        **{"root-certificate": str(credentials[0]), "private-key": "keys/site-01.key"},
    )
    with pytest.raises(ConfigError) as err:
        plan_site(site)
    assert says in err.value.message and "site-01.key" in err.value.message


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "https://127.0.0.1:9093", "coord.example.org:70000"]
)
def test_a_coordinator_address_that_is_not_host_port_is_refused(site, address):
    _deploy(site, coordinator=address)
    with pytest.raises(ConfigError, match="give HOST:PORT without a scheme"):
        plan_site(site)


def test_the_supernodes_exit_reason_is_the_last_error_line_of_its_log():
    from wardround.client.daemon import _last_error_line

    log = (
        "INFO : Starting Flower SuperNode\n"
        "ERROR : SuperLink address (127.0.0.1) cannot be parsed.\n"
        "INFO : exiting\n\n"
    )
    assert (
        _last_error_line(log)
        == "ERROR : SuperLink address (127.0.0.1) cannot be parsed."
    )
    assert _last_error_line("INFO : only this\n") == "INFO : only this"
    assert _last_error_line("") == ""
    assert len(_last_error_line("Error: " + "x" * 1000)) == 300


def test_the_operator_hears_of_an_unreachable_coordinator_and_of_the_connection(
    site, credentials, monkeypatch
):
    import functools
    import threading
    import time

    import wardround.client.daemon as daemon
    from wardround.client.connection_watch import ConnectionWatch

    # A SuperNode that opens its Runtime API, fails to reach the coordinator for a
    # while, as Flower's logs it, then registers.
    # The Runtime API answers TLS handshakes with the daemon's certificate.
    script = (
        "import socket, ssl, sys, threading, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
        "tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        "tls.load_cert_chain(sys.argv[2], sys.argv[3])\n"
        "def serve():\n"
        "    while True:\n"
        "        c, _ = s.accept()\n"
        "        try: tls.wrap_socket(c, server_side=True).close()\n"
        "        except OSError: pass\n"
        "threading.Thread(target=serve, daemon=True).start()\n"
        "for wait in (0.3, 0.6, 1.2):\n"
        "    print(f'WARNING :   Connection attempt failed, retrying in {wait} "
        "seconds', flush=True); time.sleep(wait)\n"
        "print('INFO :      Connection successful after 2.1 seconds and 4 tries.', "
        "flush=True)\n"
        "print('INFO :      SuperNode ID: 123', flush=True)\n"
        "time.sleep(120)\n"
    )
    plan = _supervised_plan(
        site,
        credentials,
        monkeypatch,
        script,
        lambda port, tls: [str(port), str(tls.certificate), str(tls.private_key)],
    )
    monkeypatch.setattr(
        daemon,
        "ConnectionWatch",
        functools.partial(ConnectionWatch, first_warning_s=0.5),
    )
    messages: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=daemon.run_site_daemon, args=(plan, stop, messages.append)
    )
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            m.startswith("connected") for m in messages
        ):
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=60)
    warnings = [m for m in messages if "has not answered" in m]
    assert warnings, messages
    assert "127.0.0.1:9" in warnings[0] and "failed attempts" in warnings[0]
    assert "`[deployment] coordinator`" in warnings[0]
    assert str(plan.state_dir / "supernode.log") in warnings[0]
    connected = [m for m in messages if m.startswith("connected")]
    assert connected == [m for m in messages if "127.0.0.1:9" in m][-1:]
    assert len(connected) == 1 and "after" in connected[0]
    assert messages.index(warnings[0]) < messages.index(connected[0])


def test_the_supernodes_log_is_read_again_from_its_start_after_a_truncation(tmp_path):
    from wardround.client.daemon import _read_from, _SuperNode

    node = object.__new__(_SuperNode)  # only its log reading, no process
    node.log_path = tmp_path / "supernode.log"
    node.log_path.write_text("first line\nsecond line\npartial")
    node.offset = node.watched_to = 0
    assert node.new_log_text() == "first line\nsecond line\n"
    assert node.new_log_text() == ""
    node.log_path.write_text("after rotation\n")  # copytruncate: shorter than before
    assert node.new_log_text() == "after rotation\n"
    assert _read_from(node.log_path, 10_000) == "after rotation\n"
