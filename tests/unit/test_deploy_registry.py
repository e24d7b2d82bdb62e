"""The coordinator's enrolled sites: add, revoke and list, audited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coordinator_files import coordinator_config as _coordinator
from coordinator_files import file_mode as _mode

from wardround.common.errors import ConfigError, FederationError
from wardround.ops.audit import read_audit
from wardround.pki import (
    generate_site_keypair,
    init_ca,
    issue_server_certificate,
    public_key_fingerprint,
)
from wardround.server import registry
from wardround.server.coordinator_config import CoordinatorConfig
from wardround.server.registry import add_site, list_sites, load_sites, revoke_site

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


def test_add_site_refuses_a_revoked_key_under_any_name(tmp_path, flwr, keys):
    config = _coordinator(tmp_path)
    add_site(config, "st-marys", keys / "st-marys.pub")
    revoke_site(config, "st-marys")
    calls = len(flwr.calls)
    for name in ("st-marys", "general"):
        with pytest.raises(ConfigError) as err:
            add_site(config, name, keys / "st-marys.pub")
        assert "was revoked (site 'st-marys'" in err.value.message
        assert f"wardround keys site {name}" in err.value.hint
    assert len(flwr.calls) == calls  # the SuperLink was not asked
    assert not load_sites(config.sites_path)["st-marys"].active


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
