"""An outsider with only the federation's public ``ca.pem`` against the coordinator.

One coordinator (no site daemons: the outsider needs none) serves the module. The
outsider uses Flower's own tools against the coordinator's PUBLIC port, as anyone
on the network could: ``flwr supernode register`` with a fresh key, ``flwr
supernode unregister`` of an enrolled site, ``flwr run`` of an app and the Runtime
API's ``AcquireTask``. Each is refused and nothing changes: the SuperLink's nodes
and runs, ``wardround sites list`` and ``wardround runs``. On the coordinator host
itself, ``AcquireTask`` on the SuperLink's loopback port is refused without the
SuperExec secret. Every process is started through the ``wardround`` CLI and
stopped by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest
import tomli_w

from wardround.common.config import RunConfig
from wardround.deploy.loopback import LoopbackFederation
from wardround.flower_compat.runtime import (
    AcquireTaskRequest,
    RuntimeHttpClient,
    SuperExecAuthHttpInterceptor,
)
from wardround.ops.audit import read_audit
from wardround.ops.env import apply_machine_hygiene
from wardround.ops.processes import flower_binary
from wardround.pki import generate_site_keypair
from wardround.server.coordinator_config import CoordinatorConfig
from wardround.server.flwr_control import flwr_json
from wardround.server.launcher import build_app

pytestmark = pytest.mark.deploy

OUTSIDER = "outsider"
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


class Outsider:
    """Flower's CLI with a private FLWR_HOME naming only the public port and ca.pem."""

    def __init__(self, root: Path, public_port: int, ca: Path) -> None:
        self.home = root / "outsider-flwr-home"
        self.home.mkdir()
        self.ca = root / "outsider-ca.pem"
        self.ca.write_bytes(ca.read_bytes())  # all an outsider has
        self.address = f"127.0.0.1:{public_port}"
        document = {
            "superlink": {
                "default": OUTSIDER,
                OUTSIDER: {"address": self.address, "root-certificates": str(self.ca)},
            }
        }
        (self.home / "config.toml").write_text(tomli_w.dumps(document))

    def flwr(self, *args: str) -> tuple[int, dict]:
        """``flwr ARGS... outsider --format json``: exit code and JSON reply."""
        saved = dict(os.environ)
        try:
            os.environ["FLWR_HOME"] = str(self.home)
            apply_machine_hygiene(self.home.parent)
            env = dict(os.environ)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        done = subprocess.run(
            [flower_binary("flwr"), *args, OUTSIDER, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        start = done.stdout.find("{")
        reply = json.loads(done.stdout[start:]) if start >= 0 else {}
        return done.returncode, reply


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory):
    fed = LoopbackFederation.create(tmp_path_factory.mktemp("outsider"), sites=1)
    try:
        fed.start_coordinator()
        site = fed.site_names[0]
        added = fed.enrol(site)
        assert added.returncode == 0, added.stderr
        yield fed
    finally:
        fed.stop_all()
        assert all(d.proc.poll() is not None for d in fed.daemons.values())


@pytest.fixture(scope="module")
def outsider(coordinator: LoopbackFederation) -> Outsider:
    return Outsider(coordinator.root, coordinator.port, coordinator.root / "pki/ca.pem")


def _admin(fed: LoopbackFederation) -> CoordinatorConfig:
    return CoordinatorConfig.from_toml(fed.coordinator_toml)


def _nodes(fed: LoopbackFederation) -> dict[int, str]:
    """The SuperLink's nodes, as the admin sees them on the loopback port."""
    reply = flwr_json(_admin(fed), "supernode", "list")
    return {int(n["node-id"]): n["status"] for n in reply.get("nodes", [])}


def _runs(fed: LoopbackFederation) -> list:
    return flwr_json(_admin(fed), "ls").get("runs", [])


def _wardround_view(fed: LoopbackFederation) -> tuple[str, str]:
    config = str(fed.coordinator_toml)
    sites = fed.cli("sites", "list", "--config", config, "--json")
    runs = fed.cli("runs", "--coordinator", config, "--json")
    assert sites.returncode == 0 and runs.returncode == 0, sites.stderr + runs.stderr
    return sites.stdout, runs.stdout


def _refused(reply: dict) -> bool:
    """``flwr --format json`` failed because nginx answered 404 (Flower never saw it)."""
    return reply.get("success") is False and "404 Not Found" in reply["error-message"]


def _superlink_pid(fed: LoopbackFederation) -> int:
    started = [
        e
        for e in read_audit(fed.state / "audit.jsonl")
        if e["event"] == "coordinator_started"
    ]
    return int(started[-1]["superlink_pid"])


def test_the_superlink_listens_on_loopback_only_and_nginx_on_the_public_port(
    coordinator,
):
    fed = coordinator
    link = psutil.Process(_superlink_pid(fed))
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in link.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", fed.internal_port)}
    public = [
        p
        for p in fed.daemons["coordinator"].family()
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == fed.port
            for c in p.net_connections(kind="inet")
        )
    ]
    assert public and all(p.name().startswith("nginx") for p in public)


def test_an_outsider_cannot_register_a_node(coordinator, outsider):
    fed = coordinator
    nodes, view = _nodes(fed), _wardround_view(fed)
    key = generate_site_keypair("intruder", fed.root / "outsider-keys")

    code, reply = outsider.flwr("supernode", "register", str(key.public_key))

    assert _refused(reply), (code, reply)
    assert _nodes(fed) == nodes
    assert _wardround_view(fed) == view


def test_an_outsider_cannot_unregister_an_enrolled_site(coordinator, outsider):
    fed = coordinator
    nodes, view = _nodes(fed), _wardround_view(fed)
    site = json.loads(view[0])[0]
    assert int(site["node_id"]) in nodes

    code, reply = outsider.flwr("supernode", "unregister", site["node_id"])

    assert _refused(reply), (code, reply)
    assert _nodes(fed) == nodes
    assert _wardround_view(fed) == view


def test_an_outsider_cannot_run_an_app(coordinator, outsider):
    fed = coordinator
    runs, view = _runs(fed), _wardround_view(fed)
    app = build_app(RunConfig(), fed.root / "outsider-apps")

    code, reply = outsider.flwr("run", str(app.folder))

    assert _refused(reply), (code, reply)
    assert _runs(fed) == runs
    assert _wardround_view(fed) == view


def test_an_outsider_cannot_acquire_a_task_nor_reach_any_other_api(
    coordinator, outsider
):
    fed = coordinator
    client = RuntimeHttpClient.from_server_address(
        outsider.address, False, outsider.ca.read_bytes(), []
    )
    with pytest.raises(httpx.HTTPStatusError) as err:
        client.AcquireTask(AcquireTaskRequest())
    assert err.value.response.status_code == 404  # nginx: never reaches Flower

    base = f"https://{outsider.address}"
    with httpx.Client(verify=str(outsider.ca)) as http:
        for path in (
            "/v1/control/list-runs",
            "/v1/control/register-node",
            "/v1/runtime/acquire-task",
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/fleet/get-run?x=/v1/control",
            "/docs",
            "/openapi.json",
            "/health",
        ):
            status = http.post(base + path, content=b"").status_code
            assert status in (403, 404), (path, status)
        assert http.get(base + "/v1/fleet/pull-messages").status_code == 403
        # Fleet calls do reach Flower, which checks the site's key
        fleet = http.post(
            base + "/v1/fleet/pull-messages",
            content=b"",
            headers={"content-type": "application/protobuf"},
        )
        assert fleet.status_code == 401, fleet.text
    # nginx's log of refused calls names the outsider's attempts
    refused = (fed.state / "nginx" / "refused.log").read_text()
    assert '"POST /v1/runtime/acquire-task" 404' in refused


def test_acquire_task_on_the_loopback_port_needs_the_superexec_secret(coordinator):
    fed = coordinator
    ca = (fed.root / "pki" / "ca.pem").read_bytes()
    address = f"127.0.0.1:{fed.internal_port}"
    local_user = RuntimeHttpClient.from_server_address(address, False, ca, [])
    with pytest.raises(httpx.HTTPStatusError) as err:
        local_user.AcquireTask(AcquireTaskRequest())
    assert err.value.response.status_code in (401, 403), err.value.response.text

    # the coordinator's own SuperExec signs with the secret and is answered
    secret = _admin(fed).superexec_secret_path
    assert secret.stat().st_mode & 0o077 == 0
    superexec = RuntimeHttpClient.from_server_address(
        address,
        False,
        ca,
        [
            SuperExecAuthHttpInterceptor(
                master_secret=secret.read_bytes(), protected_methods={ACQUIRE_TASK}
            )
        ],
    )
    superexec.AcquireTask(AcquireTaskRequest())  # no pending task: an empty answer
