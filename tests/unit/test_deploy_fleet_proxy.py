"""The nginx config in front of the SuperLink: only Fleet calls pass, nginx accepts it.

The deployment tests (tests/deploy/test_outsider.py) try the running proxy from
outside; these check the generated config itself, with the real nginx binary.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from wardround.common.errors import ConfigError
from wardround.pki import init_ca, issue_server_certificate
from wardround.server import fleet_proxy
from wardround.server.coordinator import run_coordinator
from wardround.server.coordinator_config import CoordinatorConfig
from wardround.server.fleet_proxy import (
    find_nginx,
    nginx_command,
    nginx_conf,
    write_nginx_conf,
)


def _config(root: Path, extra: str = "", state: str = "state") -> CoordinatorConfig:
    if not (root / "pki" / "coordinator.pem").exists():
        init_ca(root / "pki")
        issue_server_certificate(
            root / "pki", ["coord.example.org"], ["127.0.0.1"], root / "pki"
        )
    path = root / "coordinator.toml"
    path.write_text(
        f'[coordinator]\nhost = "127.0.0.1"\nport = 9555\ninternal-port = 9556\n'
        f'state-dir = "{state}"\n{extra}\n'
        '[tls]\nca-certificate = "pki/ca.pem"\ncertificate = "pki/coordinator.pem"\n'
        'private-key = "pki/coordinator.key"\n'
    )
    return CoordinatorConfig.from_toml(path)


def _locations(conf: str) -> list[str]:
    return [
        line.split()[1]
        for line in conf.splitlines()
        if line.strip().startswith("location ")
    ]


def test_only_the_fleet_api_is_passed_to_the_loopback_superlink(tmp_path):
    config = _config(tmp_path)
    conf = nginx_conf(config)
    assert _locations(conf) == ["/v1/fleet/", "/"]
    fleet, rest = conf.split("location / {")
    assert fleet.count("proxy_pass") == 1 and "proxy_pass" not in rest
    assert "return 404;" in rest
    assert "limit_except POST" in fleet
    assert '"^/v1/fleet/[a-z0-9-]+$"' in fleet  # no encoded, relative or query forms
    assert "server 127.0.0.1:9556;" in conf
    assert "listen 127.0.0.1:9555 ssl;" in conf
    # the federation's own certificate, and the SuperLink's checked against the CA
    assert f'ssl_certificate "{config.certificate_path}";' in conf
    assert f'ssl_certificate_key "{config.private_key_path}";' in conf
    assert "proxy_ssl_verify on;" in conf
    assert f'proxy_ssl_trusted_certificate "{config.ca_path}";' in conf
    assert 'proxy_ssl_name "coord.example.org";' in conf
    # big adapters and the SuperNode's 30 s calls fit; an outsider cannot stream
    # an unbounded body into the SuperLink's memory, nor hold every connection
    assert "client_max_body_size 1024m;" in conf
    assert "limit_conn per_address 64;" in conf
    assert "proxy_read_timeout 300s;" in conf
    # everything nginx writes stays in the state folder
    assert "daemon off;" in conf
    assert f'pid "{config.nginx_path / "nginx.pid"}";' in conf


def test_listening_on_every_interface_is_a_bare_port(tmp_path):
    config = _config(tmp_path, state="state")
    text = config.base_dir / "coordinator.toml"
    text.write_text(text.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"'))
    conf = nginx_conf(CoordinatorConfig.from_toml(text))
    assert "listen 9555 ssl;" in conf


def test_nginx_accepts_the_generated_config(tmp_path):
    config = _config(tmp_path)
    write_nginx_conf(config)
    command = [*nginx_command(config, find_nginx(config)), "-t", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (config.nginx_path / "temp").is_dir()


def test_a_state_folder_nginx_would_misread_is_refused(tmp_path):
    config = _config(tmp_path, state="state$host")
    with pytest.raises(ConfigError, match="characters nginx cannot take"):
        nginx_conf(config)


def test_a_missing_nginx_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(fleet_proxy, "SYSTEM_NGINX", tmp_path / "no-nginx")
    config = _config(tmp_path)
    with pytest.raises(ConfigError) as err:
        find_nginx(config)
    assert "nginx is not installed" in err.value.message
    assert "apt-get install nginx" in err.value.hint

    configured = _config(tmp_path, 'nginx = "/opt/none/nginx"')
    with pytest.raises(ConfigError, match="/opt/none/nginx is not an executable"):
        find_nginx(configured)


def test_the_coordinator_does_not_start_without_nginx(tmp_path):
    config = _config(tmp_path, 'nginx = "/opt/none/nginx"')
    (tmp_path / "pki" / "coordinator.key").chmod(0o600)
    with pytest.raises(ConfigError, match="nginx"):
        run_coordinator(config, threading.Event())
    assert not (config.state_path / "superlink.log").exists()  # nothing started
