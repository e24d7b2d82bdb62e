"""A real PostgreSQL server on 127.0.0.1 for the tests, from Debian's packages.

initdb into a temporary folder, then ``postgres`` started directly (its PID is
the one we stop). As root, both run as the ``postgres`` account (initdb refuses
root). Two roles: ``admin`` (loads the synthetic hospital) and
``wardround_reader``, who may only SELECT what it is granted: the account a
hospital's IT gives a site.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DATABASE = "hospital"
READER = "wardround_reader"


@dataclass(frozen=True)
class Postgres:
    """A running server: where it is and its two accounts."""

    host: str
    port: int
    admin_password: str
    reader_password: str
    pid: int

    def url(self, user: str = READER) -> str:
        """``postgresql://user@host:port/hospital`` (no password)."""
        return f"postgresql://{user}@{self.host}:{self.port}/{DATABASE}"


def _binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail(
            "PostgreSQL is not installed: apt-get install -y postgresql "
            "(.ci/run installs it)"
        )
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user() -> dict[str, str]:
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def _sql(bin_dir: Path, port: int, socket_dir: Path, password: str, sql: str) -> None:
    subprocess.run(
        [
            str(bin_dir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(socket_dir),
            "-p",
            str(port),
            "-U",
            "admin",
            "-d",
            "postgres",
            "-c",
            sql,
        ],
        check=True,
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        **_as_server_user(),  # type: ignore[call-overload]
    )


def start_postgres(root: Path) -> tuple[Postgres, subprocess.Popen[bytes]]:
    """initdb and start a server under ``root``; wait until it accepts logins."""
    bin_dir = _binaries()
    root.mkdir(parents=True, exist_ok=True)
    root.parent.chmod(0o755)
    data, socket_dir = root / "data", root / "socket"
    socket_dir.mkdir()
    admin_password = secrets.token_urlsafe(16)
    reader_password = secrets.token_urlsafe(16) + "%@:/"  # characters a URL must escape
    password_file = root / "admin.pw"
    password_file.write_text(admin_password)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(socket_dir, "postgres", "postgres")
        shutil.chown(password_file, "postgres", "postgres")
    subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "admin",
            "-A",
            "scram-sha-256",
            f"--pwfile={password_file}",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        **_as_server_user(),  # type: ignore[call-overload]
    )
    password_file.unlink()
    port = _free_port()
    process = subprocess.Popen(
        [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("wb"),
        **_as_server_user(),  # type: ignore[call-overload]
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            _sql(bin_dir, port, socket_dir, admin_password, "SELECT 1")
            break
        except subprocess.CalledProcessError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_postgres(process)
                pytest.fail(
                    f"PostgreSQL did not start: {(root / 'server.log').read_text()}"
                )
            time.sleep(0.2)
    _sql(bin_dir, port, socket_dir, admin_password, f"CREATE DATABASE {DATABASE}")
    quoted = reader_password.replace("'", "''")
    _sql(
        bin_dir,
        port,
        socket_dir,
        admin_password,
        f"CREATE ROLE {READER} LOGIN PASSWORD '{quoted}'",
    )
    server = Postgres("127.0.0.1", port, admin_password, reader_password, process.pid)
    return server, process


def stop_postgres(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown by PID (SIGINT), then SIGKILL if it does not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL for the session (tables are per test or per site)."""
    # Not under pytest's temporary folder: that is private to root, and the
    # server runs as the postgres account.
    root = Path(tempfile.mkdtemp(prefix="wr-postgres-"))
    try:
        server, process = start_postgres(root / "server")
        try:
            yield server
        finally:
            stop_postgres(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
