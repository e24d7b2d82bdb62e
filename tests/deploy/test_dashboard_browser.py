"""The dashboards in a real headless browser during a loopback deployment run.

Debian's chromium and chromium-driver, driven by selenium (``.ci/run`` installs
them). One federation and one run serve the module: the coordinator's runs page
shows the round count going up, its sites page each site online, its privacy page
each site's epsilon; a site killed mid-run turns offline within Flower's heartbeat
tolerance; the site dashboard's ledger equals ``wardround site privacy --json``.
Each page is saved as a screenshot in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wardround import __version__
from wardround.common.release import version_from_metrics, version_metrics
from wardround.deploy.loopback import LoopbackFederation, read_jsonl, wait_for

pytestmark = pytest.mark.deploy

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROUNDS = 12
# Killing a site costs the round it was in: its reply never comes (round-timeout-s).
# Enough rounds that the run is still going when the second test kills a site: a
# plain loopback round takes a few seconds, and the first test watches two of them.
RUN = f"""
[federation]
rounds = {ROUNDS}
min-sites = 2
round-timeout-s = 60
join-timeout-s = 20
seed = 17
[secure-aggregation]
enabled = false
[model]
image-size = 32
max-note-tokens = 32
base = "random"
[train]
batch-size = 8
"""
VICTIM = "site-03"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail(
                "chromium and chromium-driver are missing; .ci/run installs them"
            )
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1366,900",  # the smallest screen the issue names
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.shots = tmp_path_factory.mktemp("screenshots")  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> Path:
    path = driver.shots / f"{name}.png"
    driver.save_screenshot(str(path))
    if folder := os.environ.get("WARDROUND_SCREENSHOTS"):  # docs/images refresh
        shutil.copy(path, Path(folder) / path.name)
    return path


def _texts(driver, url: str, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    driver.get(url)
    return [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, css)]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    fed = LoopbackFederation.create(tmp_path_factory.mktemp("dash"))
    try:
        fed.start_coordinator()
        for name in fed.site_names:
            added = fed.cli(
                "sites", "add", name, "--key", str(fed.root / "keys" / f"{name}.pub"),
                "--config", str(fed.coordinator_toml),
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            fed.start_site(name)
        fed.wait_online(fed.site_names)
        run_toml = fed.run_toml("dash.toml", RUN)
        fed.approve(fed.app_hash(run_toml), fed.site_names)
        fed.run_name = ""  # type: ignore[attr-defined]
        yield fed
    finally:
        fed.stop_all()
        assert all(not d.family() for d in fed.daemons.values())


def _coordinator(fed: LoopbackFederation, path: str) -> str:
    return f"http://127.0.0.1:{fed.dashboard_port}{path}"


def _round_shown(driver, fed) -> int:
    shown = _texts(
        driver,
        _coordinator(fed, "/runs"),
        f'tr[data-run="{fed.run_name}"] .round-count',
    )
    return int(shown[0]) if shown else -1


def test_the_runs_sites_and_privacy_pages_follow_a_live_run(fed, browser):
    started = fed.cli(
        "launch", "--config", str(fed.root / "dash.toml"), "--coordinator",
        str(fed.coordinator_toml), "--detach",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    fed.run_name = started.stdout.split()[1]

    states = dict(
        zip(
            _texts(
                browser, _coordinator(fed, "/sites"), "tr[data-site] td:first-child"
            ),
            _texts(browser, _coordinator(fed, "/sites"), "tr[data-site] td.state"),
            strict=True,
        )
    )
    assert states == {name: "online" for name in fed.site_names}
    _shot(browser, "coordinator-sites")

    wait_for(lambda: _round_shown(browser, fed) >= 0, 60, "the run on the runs page")
    seen = [_round_shown(browser, fed)]
    deadline = time.monotonic() + 600
    while seen[-1] < 2 and time.monotonic() < deadline:
        time.sleep(2)
        shown = _round_shown(browser, fed)
        if shown != seen[-1]:
            seen.append(shown)
    assert seen[-1] >= 2 and seen == sorted(seen) and len(set(seen)) >= 2, seen
    _shot(browser, "coordinator-runs")

    privacy_css = f'table.privacy[data-run="{fed.run_name}"] tr[data-site]'
    sites = _texts(
        browser, _coordinator(fed, "/privacy"), f"{privacy_css} td:first-child"
    )
    epsilons = [
        float(t)
        for t in _texts(
            browser, _coordinator(fed, "/privacy"), f"{privacy_css} td.epsilon"
        )
    ]
    assert sorted(sites) == fed.site_names
    assert all(0 < eps <= 8.0 for eps in epsilons), epsilons
    assert "the sites' own figures" in browser.page_source
    budgets = _texts(browser, _coordinator(fed, "/privacy"), f"{privacy_css} td.budget")
    assert all(float(b) > 0 for b in budgets) and len(budgets) == len(sites)
    _shot(browser, "coordinator-privacy")

    # Every site that replied states its release on the sites page.
    release = version_from_metrics(version_metrics(__version__))
    assert _texts(browser, _coordinator(fed, "/sites"), "tr[data-site] td.version") == [
        release
    ] * len(fed.site_names)


def test_a_site_killed_mid_run_shows_offline_within_the_heartbeat_tolerance(
    fed, browser
):
    from wardround.flower_compat.constants import (
        HEARTBEAT_DEFAULT_INTERVAL,
        HEARTBEAT_PATIENCE,
    )

    run_dir = fed.state / "runs" / fed.run_name
    assert len(read_jsonl(run_dir / "rounds.jsonl")) - 1 < ROUNDS, (
        "the run ended already"
    )
    fed.kill(VICTIM)
    killed = time.monotonic()
    tolerance = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
    css = f'tr[data-site="{VICTIM}"] td.state'
    wait_for(
        lambda: _texts(browser, _coordinator(fed, "/sites"), css) == ["offline"],
        tolerance + 15,  # + the dashboard's few seconds of caching and polling
        f"{VICTIM} offline on the sites page",
        poll_s=2,
    )
    took = time.monotonic() - killed
    print(
        f"{VICTIM} shown offline {took:.0f} s after SIGKILL (tolerance {tolerance} s)"
    )
    assert took <= tolerance + 15
    _shot(browser, "coordinator-sites-offline")


def test_the_site_dashboard_shows_the_ledger_as_site_privacy_json(fed, browser):
    run_dir = fed.state / "runs" / fed.run_name
    wait_for(
        lambda: json.loads((run_dir / "status.json").read_text()).get("state") in ("finished", "failed", "stopped"),
        600, "the run to end", poll_s=2,
    )  # fmt: skip
    status = json.loads((run_dir / "status.json").read_text())
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    failures = [f for r in rounds for f in r["failures"]]
    assert status["state"] == "finished", (status, failures)
    # Every failure names a site's own node, once per phase: the SuperLink's reply
    # for the killed site (sent from its own node id) is the site's failure.
    nodes = {t["node_id"] for t in rounds[1]["train"]}
    assert len(nodes) == len(fed.site_names)
    assert {f["node_id"] for f in failures} <= nodes, failures
    phases = [
        (f["node_id"], f["phase"], r["round"]) for r in rounds for f in r["failures"]
    ]
    assert len(phases) == len(set(phases)), failures
    pages = {
        "runs-finished": "/runs",
        "run": f"/runs/{fed.run_name}",
        "traffic": "/traffic",
        "audit": "/audit",
    }
    for name, path in pages.items():
        browser.get(_coordinator(fed, path))
        assert "Internal Server Error" not in browser.page_source
        _shot(browser, f"coordinator-{name}")

    site = fed.site_names[0]
    port = fed.site_dashboard_ports[site]
    cli = fed.cli("site", "privacy", "--config", str(fed.site_toml(site)), "--json")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    assert expected["rounds"] >= ROUNDS - 1
    total = _texts(browser, f"http://127.0.0.1:{port}/privacy", "#epsilon-total")
    assert total == [f"{expected['epsilon_total']:.3f}"]
    runs = dict(
        zip(
            _texts(
                browser,
                f"http://127.0.0.1:{port}/privacy",
                "#ledger-runs tr[data-run] td:first-child",
            ),
            _texts(
                browser, f"http://127.0.0.1:{port}/privacy", "#ledger-runs td.epsilon"
            ),
            strict=True,
        )
    )
    assert runs == {run: f"{eps:.3f}" for run, eps in expected["runs"].items()}
    _shot(browser, "site-privacy")
    sent = _texts(
        browser, f"http://127.0.0.1:{port}/sent", "#sent tbody tr td:nth-child(4)"
    )
    assert "train" in sent and "evaluate" in sent, sent
    for page in ("sent", "check", "approvals", "audit"):
        browser.get(f"http://127.0.0.1:{port}/{page}")
        assert "Internal Server Error" not in browser.page_source
        _shot(browser, f"site-{page}")

    for url, wanted in (
        (_coordinator(fed, "/metrics"), "wardround_run_rounds_completed"),
        (f"http://127.0.0.1:{port}/metrics", "wardround_site_epsilon_spent"),
    ):
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert wanted in {f.name for f in text_string_to_metric_families(text)}, url
