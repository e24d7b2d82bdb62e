"""The dashboards' pages, /metrics and guard, over files written the way the daemons write them."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from typer.testing import CliRunner

from wardround.cli import app as cli_app
from wardround.common.errors import ConfigError
from wardround.dashboard.web import Exposure, check_exposure
from wardround.ops.audit import AuditLog
from wardround.server.dashboard.app import build_app
from wardround.server.dashboard.state import CoordinatorSource, learning_series
from wardround.server.records import (
    PrivacySpend,
    RoundRecord,
    SiteEvalReport,
    SiteFailure,
    SiteTrainReport,
)
from wardround.server.registry import EnrolledSite, save_sites

RUN = "20261205-010000-abcdef12"
SITES = ["site-01", "site-02"]
TOKEN = "t" * 40
LOOPBACK = Exposure(host="127.0.0.1", port=9095)
# TestClient names "testserver" unless told; a loopback dashboard answers loopback names
LOCAL = "http://127.0.0.1:9095"


def _round(r: int, failures=()) -> dict:
    train = [] if r == 0 else [
        SiteTrainReport(
            node_id=10 + i, site=s, num_examples=40, loss=0.7 - 0.1 * r, steps=5,
            seconds=1.0, delta_l2=0.1, bytes_sent=30_000 + r,
            privacy=PrivacySpend(
                epsilon_run=1.5 * r + i, epsilon_run_prv=1.4 * r, epsilon_total=2.0 * r + i,
                delta=1e-5, noise_multiplier=0.9, sample_rate=0.1, steps=5, max_grad_norm=1.0,
                epsilon_budget=10.0 if s == "site-01" else None,
            ),
            software_version="0.1.0" if s == "site-01" else None,
        )
        for i, s in enumerate(SITES)
    ]  # fmt: skip
    evaluate = [
        SiteEvalReport(node_id=10 + i, site=s, num_examples=10, loss=0.69 - 0.05 * r,
                       auroc_macro=0.5 + 0.1 * r, auroc_per_label={"a": 0.5})
        for i, s in enumerate(SITES)
    ]  # fmt: skip
    return RoundRecord(
        round=r, train=train, evaluate=evaluate, failures=list(failures),
        global_auroc=0.5 + 0.1 * r, global_loss=0.69 - 0.05 * r, train_loss=0.7,
        adapter_sha256="0" * 64, seconds=12.5, aggregation_seconds=0.1,
    ).to_json()  # fmt: skip


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "coordinator-state"
    run = state / "runs" / RUN
    (run / "manifests").mkdir(parents=True)
    save_sites(
        state / "sites.json",
        {
            s: EnrolledSite(name=s, node_id=10 + i, public_key_sha256="ab" * 32,
                            enrolled_at="2026-12-05T00:00:00+00:00")
            for i, s in enumerate([*SITES, "site-03"])
        },
    )  # fmt: skip
    (run / "launch.json").write_text(
        json.dumps({"name": RUN, "fab_hash": "f" * 64, "launched_at": "2026-12-05T01:00:00+00:00",
                    "wardround_version": "0.1.0", "flower_run_ids": [1]})
    )  # fmt: skip
    (run / "status.json").write_text(
        json.dumps({"state": "running", "round": 2, "rounds": 3})
    )
    (run / "run-config.toml").write_text(
        "[federation]\nrounds = 3\n[privacy]\nenabled = true\ntarget-epsilon = 8.0\n"
    )
    refused = SiteFailure(
        node_id=12,
        phase="train",
        reason="this site has not approved app",
        kind="AppNotApproved",
    )
    unavailable = SiteFailure(node_id=1, phase="evaluate", reason="Node Unavailable")
    rows = [_round(0), _round(1), _round(2, [refused, unavailable])]
    (run / "rounds.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"torn'
    )
    for r in range(3):
        (run / "manifests" / f"round-{r:03d}.json").write_text(json.dumps({"round": r}))
    checkpoint = run / "checkpoints" / "round-002"
    checkpoint.mkdir(parents=True)
    from safetensors.numpy import save_file

    save_file(
        {"lora_A": np.zeros((4, 8), np.float32)},
        str(checkpoint / "adapter.safetensors"),
    )
    audit = AuditLog(state / "audit.jsonl", actor="coordinator")
    audit.record("coordinator_started", port=9093)
    audit.record("site_enrolled", site="site-01", node_id="10")
    audit.record("run_started", run_id=RUN)
    return state


def _source(state: Path, online=("site-01", "site-02")) -> CoordinatorSource:
    def status():
        return [
            {"site": s, "state": "online" if s in online else "offline",
             "online_at": "2026-12-05T01:00:00", "offline_at": "N/A"}
            for s in [*SITES, "site-03"]
        ]  # fmt: skip

    return CoordinatorSource(
        runs_root=state / "runs", sites_path=state / "sites.json",
        audit_paths=(state / "audit.jsonl",), site_status=status,
    )  # fmt: skip


def test_the_coordinator_pages_show_runs_sites_privacy_traffic_and_audit(state):
    client = TestClient(
        build_app(_source(state, online=("site-01",)), LOOPBACK), base_url=LOCAL
    )

    runs = client.get("/runs")
    assert runs.status_code == 200
    assert 'class="round-count">2</span> / 3' in runs.text
    assert 'http-equiv="refresh"' in runs.text  # live while the run goes
    run = client.get(f"/runs/{RUN}").text
    assert "round-002.json" in run and "adapter.zip" in run
    for kind in ("auroc", "loss", "traffic"):
        chart = client.get(f"/runs/{RUN}/chart/{kind}.svg")
        assert chart.headers["content-type"].startswith("image/svg+xml")
        assert chart.text.lstrip().startswith("<?xml") and "<svg" in chart.text
    assert client.get(f"/runs/{RUN}/manifests/round-001.json").json() == {"round": 1}
    archive = zipfile.ZipFile(
        io.BytesIO(client.get(f"/runs/{RUN}/adapter.zip").content)
    )
    assert archive.namelist() == ["adapter.safetensors"]

    sites = client.get("/sites").text
    assert sites.count('class="state state-online">online') == 1
    assert sites.count('class="state state-offline">offline') == 2
    site_01 = sites.split('data-site="site-01"')[1].split("</tr>")[0]
    assert '<td class="version">0.1.0</td>' in site_01
    site_02 = sites.split('data-site="site-02"')[1].split("</tr>")[0]
    assert "not reported" in site_02
    site_03 = sites.split('data-site="site-03"')[1].split("</tr>")[0]
    assert "AppNotApproved" in site_03 and "this site has not approved app" in site_03
    assert 'data-site="node 1"' not in sites  # Flower's own node is no site
    assert "Node Unavailable" in sites.split('id="unattributed"')[1]

    privacy = client.get("/privacy").text
    assert "the sites' own figures" in privacy
    assert '<td class="num epsilon">3.000</td>' in privacy  # site-01 after round 2
    assert '<td class="num epsilon">4.000</td>' in privacy  # site-02
    # Lifetime: site-01 reported epsilon 4 of its budget 10; site-02 no budget.
    site_01 = privacy.split('<tr data-site="site-01">')[1].split("</tr>")[0]
    assert '<td class="num budget">10.00</td>' in site_01
    assert '<td class="num budget-remaining">6.000</td>' in site_01
    site_02 = privacy.split('<tr data-site="site-02">')[1].split("</tr>")[0]
    assert '<td class="num budget">–</td>' in site_02
    assert '<td class="num epsilon-total">5.000</td>' in site_02
    traffic = client.get("/traffic").text
    assert "29.3 KiB" in traffic and "global adapter" in traffic

    audit = client.get("/audit").text
    assert "verified" in audit and "site_enrolled" in audit
    only = client.get("/audit", params={"event": "run_started"}).text
    assert "run_started" in only and "coordinator_started</td>" not in only


def test_the_coordinator_metrics_parse_with_the_prometheus_parser(state):
    client = TestClient(build_app(_source(state), LOOPBACK), base_url=LOCAL)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("wardround_run_rounds_completed", (("run", RUN),))] == 2
    assert samples[("wardround_run_rounds_planned", (("run", RUN),))] == 3
    assert samples[("wardround_round_duration_seconds_count", (("run", RUN),))] == 2
    assert samples[("wardround_round_duration_seconds_sum", (("run", RUN),))] == 25.0
    assert (
        samples[("wardround_site_epsilon_run", (("run", RUN), ("site", "site-02")))]
        == 4.0
    )
    assert (
        samples[
            ("wardround_site_bytes_sent_total", (("run", RUN), ("site", "site-01")))
        ]
        == 60_003
    )
    assert samples[("wardround_sites_online", ())] == 2
    site_01 = (("run", RUN), ("site", "site-01"))
    assert samples[("wardround_site_reported_epsilon_budget", site_01)] == 10.0
    assert samples[("wardround_site_reported_epsilon_lifetime", site_01)] == 4.0
    assert (
        "wardround_site_reported_epsilon_budget",
        (("run", RUN), ("site", "site-02")),
    ) not in samples
    release = (("site", "site-01"), ("version", "0.1.0"))
    assert samples[("wardround_site_release_info", release)] == 1.0
    assert samples[("wardround_sites_enrolled", ())] == 3
    assert (
        samples[
            (
                "wardround_site_refusals_total",
                (("kind", "AppNotApproved"), ("node_id", "12"), ("run", RUN)),
            )
        ]
        == 1
    )
    assert samples[("wardround_runs", (("state", "running"),))] == 1


def test_the_dashboard_is_read_only_and_names_nothing_outside_its_runs(state):
    client = TestClient(build_app(_source(state), LOOPBACK), base_url=LOCAL)
    for method in ("post", "put", "delete"):
        response = getattr(client, method)("/runs")
        assert response.status_code == 405
        assert "read-only" in response.text
    assert client.get("/runs/..%2F..%2Fsites.json").status_code == 404
    assert client.get(f"/runs/{RUN}/manifests/..%2F..%2Flaunch.json").status_code == 404
    assert client.get("/runs/nope/chart/auroc.svg").status_code == 404
    page = client.get("/runs")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text.replace(
        "http-equiv", ""
    )  # nothing from elsewhere
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/login", follow_redirects=False).status_code == 303  # no token


def test_a_loopback_dashboard_answers_only_requests_addressed_to_loopback(state):
    # a web page whose name its owner re-points at 127.0.0.1 (DNS rebinding) sends
    # its own name as Host; the browser would then let that page read the answer
    client = TestClient(build_app(_source(state), LOOPBACK), base_url=LOCAL)
    for host in (
        "127.0.0.1:9095",
        "localhost:9095",
        "[::1]:9095",
        "127.0.0.1",
        "LOCALHOST",
    ):
        assert client.get("/runs", headers={"host": host}).status_code == 200, host
    for host in (
        "attacker.example:9095",
        "127.0.0.1.attacker.example",
        "localhost.attacker.example",
        "[::1",
        "",
    ):
        response = client.get("/metrics", headers={"host": host})
        assert response.status_code == 421, host
        assert "SSH tunnel" in response.text
        assert "wardround_" not in response.text
    # off loopback the token and TLS protect it: a DNS name is how it is reached
    exposed = Exposure(host="0.0.0.0", port=9095, token=TOKEN)
    remote = TestClient(
        build_app(_source(state), exposed), base_url="http://dash.example"
    )
    answer = remote.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200


def test_a_token_is_asked_of_every_page_and_of_metrics(state):
    exposure = Exposure(host="127.0.0.1", port=9095, token=TOKEN)
    client = TestClient(
        build_app(_source(state), exposure), base_url=LOCAL, follow_redirects=False
    )
    assert client.get("/runs").headers["location"] == "/login"
    assert 'name="token"' in client.get("/login").text
    assert client.get("/metrics").status_code == 401
    assert (
        client.get("/metrics", headers={"authorization": "Bearer wrong"}).status_code
        == 401
    )
    assert (
        client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"}).status_code
        == 200
    )
    assert (
        client.post(
            "/login",
            content="token=wrong",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ).status_code
        == 200
    )
    signed_in = client.post(
        "/login",
        content=f"token={TOKEN}",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert signed_in.status_code == 303
    assert "httponly" in signed_in.headers["set-cookie"].lower()
    assert client.get("/runs").status_code == 200  # the cookie


def _token_file(tmp_path: Path, text: str = TOKEN, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def test_off_loopback_the_dashboard_needs_tls_and_a_token(tmp_path):
    with pytest.raises(ConfigError, match="token-file and TLS"):
        check_exposure(
            "[dashboard]", "0.0.0.0", 9095, token_file=None, certfile=None, keyfile=None
        )
    token = _token_file(tmp_path)
    with pytest.raises(ConfigError, match="needs TLS"):
        check_exposure(
            "[dashboard]",
            "dashboard.hospital.example",
            9095,
            token_file=token,
            certfile=None,
            keyfile=None,
        )
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    exposure = check_exposure(
        "[dashboard]",
        "dashboard.hospital.example",
        9095,
        token_file=token,
        certfile=cert,
        keyfile=key,
    )
    assert (
        exposure.url == "https://dashboard.hospital.example:9095/"
        and exposure.token == TOKEN
    )
    with pytest.raises(ConfigError, match="readable by other users"):
        check_exposure(
            "[dashboard]",
            "127.0.0.1",
            1,
            token_file=_token_file(tmp_path, mode=0o644),
            certfile=None,
            keyfile=None,
        )
    with pytest.raises(ConfigError, match="at least 32 characters"):
        check_exposure(
            "[dashboard]",
            "127.0.0.1",
            1,
            token_file=_token_file(tmp_path, "short"),
            certfile=None,
            keyfile=None,
        )
    assert (
        check_exposure(
            "[dashboard]", "::1", 1, token_file=None, certfile=None, keyfile=None
        ).url
        == "http://[::1]:1/"
    )


def test_wardround_dashboard_refuses_what_it_cannot_serve(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["dashboard"])
    assert result.exit_code == 2 and "give one of" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli_app, ["dashboard", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "is not a run directory" in result.output
    result = runner.invoke(
        cli_app, ["dashboard", str(tmp_path / "empty"), "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2 and "token-file and TLS" in result.output


def test_wardround_dashboard_serves_a_run_directory(state, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from wardround.deploy.loopback import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wardround.cli", "dashboard", str(state / "runs" / RUN), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/runs", timeout=2
                ) as page:
                    assert 'class="round-count">2</span>' in page.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"run dashboard on http://127.0.0.1:{port}/" in out


def test_the_dashboard_sections_refuse_unknown_keys_and_clashing_ports(tmp_path):
    from wardround.server.coordinator import _check_ports_free
    from wardround.server.coordinator_config import CoordinatorConfig

    path = tmp_path / "coordinator.toml"
    tls = '[tls]\nca-certificate = "ca.pem"\ncertificate = "c.pem"\nprivate-key = "k.pem"\n'
    path.write_text(tls + '[dashboard]\nhots = "x"\n')
    with pytest.raises(ConfigError, match="hots"):
        CoordinatorConfig.from_toml(path)
    path.write_text(tls + "[coordinator]\nport = 9300\n[dashboard]\nport = 9300\n")
    with pytest.raises(ConfigError, match=r"\[dashboard\] port 9300 is also used"):
        _check_ports_free(CoordinatorConfig.from_toml(path))


def test_a_dashboard_with_tls_and_a_token_serves_only_those_who_give_it(
    state, tmp_path
):
    import ssl
    import urllib.error
    import urllib.request

    from wardround.dashboard.web import DashboardServer
    from wardround.deploy.loopback import free_port
    from wardround.pki import init_ca, issue_server_certificate

    ca = init_ca(tmp_path / "pki")
    server_files = issue_server_certificate(
        tmp_path / "pki", ["localhost"], ["127.0.0.1"], tmp_path / "pki"
    )
    exposure = check_exposure(
        "[dashboard]",
        "127.0.0.1",
        free_port(),
        token_file=_token_file(tmp_path),
        certfile=server_files.cert,
        keyfile=server_files.key,
    )
    server = DashboardServer(build_app(_source(state), exposure), exposure, "test")
    server.start()
    context = ssl.create_default_context(cafile=str(ca.cert))
    try:
        url = f"https://127.0.0.1:{exposure.port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, context=context, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, context=context, timeout=10) as reply:
            names = {
                f.name for f in text_string_to_metric_families(reply.read().decode())
            }
        assert "wardround_run_rounds_completed" in names
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{exposure.port}/runs", timeout=10)
    finally:
        server.stop()
    assert not server.thread.is_alive()


@pytest.mark.parametrize("federation", ["personal = true", "own-model-weight = 0.5"])
def test_a_personalised_run_is_not_shown_as_a_global_model(state, federation):
    # each site scores a model of its own: the sites' mean is no global model's
    run_dir = state / "runs" / RUN
    (run_dir / "run-config.toml").write_text(
        f"[federation]\nrounds = 3\n{federation}\n"
    )
    source = _source(state)
    client = TestClient(build_app(source, LOOPBACK), base_url=LOCAL)

    page = client.get(f"/runs/{RUN}").text
    assert "AUROC, all sites" in page and "global AUROC" not in page
    assert "AUROC per site and all sites by round" in page
    assert client.get(f"/runs/{RUN}/chart/auroc.svg").status_code == 200
    view = source.find_run(RUN)
    assert view is not None and view.personalised
    auroc, loss = learning_series(view)
    assert "global" not in auroc and [v for _, v in auroc["all sites"]] == [
        pytest.approx(0.5 + 0.1 * r) for r in range(3)
    ]
    assert "global" not in loss and "all sites" in loss


def test_a_plain_run_shows_the_global_model(state):
    page = TestClient(build_app(_source(state), LOOPBACK), base_url=LOCAL).get(
        f"/runs/{RUN}"
    )
    assert "global AUROC" in page.text and "all sites" not in page.text


def test_every_link_resolves_for_a_run_copied_under_another_name(state, tmp_path):
    # `launch --out DIR` copies a run into a folder named as the admin likes; the
    # pages show the run's name but address it by its folder
    import re
    import shutil

    copy = tmp_path / "runs-out"
    shutil.copytree(state / "runs" / RUN, copy)
    client = TestClient(
        build_app(CoordinatorSource(single_run=copy), LOOPBACK), base_url=LOCAL
    )
    seen: set[str] = set()
    pending = ["/runs", "/traffic", "/privacy"]
    while pending:
        page = client.get(pending.pop())
        assert page.status_code == 200, page.url
        if "html" not in page.headers["content-type"]:
            continue
        assert RUN in page.text  # the run's own name is what is shown
        for link in re.findall(r'(?:href|src)="(/runs/[^"?]+)', page.text):
            if link not in seen:
                seen.add(link)
                pending.append(link)
    assert f"/runs/{copy.name}" in seen
    assert f"/runs/{copy.name}/chart/auroc.svg" in seen
    assert f"/runs/{copy.name}/adapter.zip" in seen
