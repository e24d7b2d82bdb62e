"""A real Orthanc PACS on loopback for tests and benchmarks (Debian's orthanc packages).

Orthanc 1.10 binds its HTTP and DICOM ports on every interface (it has no bind
address setting), so the configuration closes it instead: HTTP refuses clients other
than 127.0.0.1 (``RemoteAccessAllowed`` false) and asks for a password; DICOM answers
only the AE ``WARDROUND`` from 127.0.0.1 (``DicomCheckModalityHost``, no "always
allow"), and that AE may echo, find, get and move but never store. The process is
stopped by its PID.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb"
PACS_AET = "ORTHANC"
OUR_AET = "WARDROUND"
USERNAME = "reader"


@dataclass(frozen=True)
class OrthancServer:
    """How to reach a running test Orthanc."""

    http_url: str  # REST API root, e.g. http://127.0.0.1:8042
    dicomweb_url: str
    dicom_port: int
    aet: str
    username: str
    password: str
    pid: int
    move_port: int  # where Orthanc sends C-MOVE results for our AE
    workdir: Path

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_installed() -> bool:
    return os.access(ORTHANC, os.X_OK) and Path(DICOMWEB_PLUGIN).is_file()


def start_orthanc(
    workdir: Path, *, nodelay: bool = True, timeout_s: float = 30.0
) -> OrthancServer:
    """Start Orthanc with its storage under ``workdir``; return once it answers.

    ``nodelay`` sets DCMTK's ``TCP_NODELAY`` switch: without it every DIMSE reply
    from Orthanc waits for the peer's delayed ACK (~40 ms on loopback), which is
    Orthanc's default and not how most PACS are tuned.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port, move_port = free_port(), free_port(), free_port()
    password = secrets.token_urlsafe(16)
    config = {
        "Name": "wardround-test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": PACS_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USERNAME: password},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomCheckModalityHost": True,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {
            "wardround": {
                "AET": OUR_AET,
                "Host": "127.0.0.1",
                "Port": move_port,
                "AllowEcho": True,
                "AllowFind": True,
                "AllowGet": True,
                "AllowMove": True,
                "AllowStore": False,
            }
        },
        "DicomScpTimeout": 30,
        "SaveJobs": False,
        "StableAge": 1,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (workdir / "orthanc.log").open("wb")
    env = {**os.environ, "TCP_NODELAY": "1" if nodelay else "0"}
    proc = subprocess.Popen(
        [ORTHANC, str(config_path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
    )
    log.close()
    server = OrthancServer(
        http_url=f"http://127.0.0.1:{http_port}",
        dicomweb_url=f"http://127.0.0.1:{http_port}/dicom-web",
        dicom_port=dicom_port,
        aet=PACS_AET,
        username=USERNAME,
        password=password,
        pid=proc.pid,
        move_port=move_port,
        workdir=workdir,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if requests.get(
                f"{server.http_url}/system", auth=server.auth, timeout=2
            ).ok:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    stop_orthanc(server)
    tail = (workdir / "orthanc.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"Orthanc did not start within {timeout_s:.0f} s:\n{tail}")


def stop_orthanc(server: OrthancServer, *, grace_s: float = 10.0) -> None:
    """SIGTERM the Orthanc we started (by PID), then SIGKILL if it lingers."""
    try:
        os.kill(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        pid, _ = os.waitpid(server.pid, os.WNOHANG)
        if pid:
            return
        time.sleep(0.05)
    os.kill(server.pid, signal.SIGKILL)
    os.waitpid(server.pid, 0)


def upload_folder(server: OrthancServer, folder: Path) -> int:
    """POST every file under ``folder`` to Orthanc's REST API; the number stored.

    This is how the tests fill the PACS, not how a site reads it (sites only read).
    """
    stored = 0
    with requests.Session() as session:
        session.auth = server.auth
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            response = session.post(
                f"{server.http_url}/instances", data=path.read_bytes(), timeout=30
            )
            response.raise_for_status()
            stored += 1
    return stored


def instance_count(server: OrthancServer) -> int:
    """How many instances Orthanc holds (GET /statistics)."""
    response = requests.get(
        f"{server.http_url}/statistics", auth=server.auth, timeout=10
    )
    response.raise_for_status()
    return int(response.json()["CountInstances"])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A running Orthanc on 127.0.0.1 for the module, stopped by PID at its end."""
    if not orthanc_installed():
        pytest.fail(f"Orthanc with the DICOMweb plugin is needed: {INSTALL_HINT}")
    workdir = tmp_path_factory.mktemp("orthanc")
    server = start_orthanc(workdir)
    try:
        yield server
    finally:
        stop_orthanc(server)
        shutil.rmtree(workdir / "storage", ignore_errors=True)
