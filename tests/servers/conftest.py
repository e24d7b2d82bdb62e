"""Real servers on 127.0.0.1 (PostgreSQL, Orthanc), started by fixtures, stopped by PID."""

from orthanc_server import orthanc  # noqa: F401
from postgres_server import postgres  # noqa: F401
