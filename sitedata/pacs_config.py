"""``[data.pacs]`` in ``site.toml``: which PACS the site reads its images from, and how.

DICOMweb::

    [data.pacs]
    protocol = "dicomweb"
    url = "https://pacs.example.org/dicom-web"
    username = "wardround"
    password-file = "secrets/pacs-password"   # mode 0600; or password-env

DIMSE (C-GET by default; C-MOVE where the PACS allows no C-GET)::

    [data.pacs]
    protocol = "dimse"
    host = "pacs.example.org"
    port = 104
    called-ae = "PACS"
    calling-ae = "WARDROUND"   # the PACS must know this AE
    retrieve = "c-move"
    move-port = 11113          # where the PACS sends C-MOVE results to us

The password lives in a file or the environment (:mod:`.secrets`), never here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from ..common.errors import ConfigError
from .secrets import SecretSource


class PacsProtocol(StrEnum):
    """How wardround talks to the PACS."""

    DICOMWEB = "dicomweb"  # QIDO-RS and WADO-RS over HTTP(S)
    DIMSE = "dimse"  # C-FIND and C-GET / C-MOVE over the DICOM port


class DimseRetrieve(StrEnum):
    """How DIMSE instances come back to us."""

    C_GET = "c-get"  # on our own association: no port opens on the site
    C_MOVE = "c-move"  # the PACS connects back to a Storage SCP we run for the sync


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or len(stripped) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(
            "an AE title is 1 to 16 printable characters without a backslash"
        )
    return stripped


AeTitle = Annotated[str, AfterValidator(_check_ae_title)]


class PacsSection(SecretSource):
    """The hospital's PACS, read-only: QIDO/WADO GETs, or C-ECHO/C-FIND/C-GET/C-MOVE.

    ``password-file`` / ``password-env`` (from :class:`.SecretSource`) hold the
    DICOMweb password; DIMSE has none (the PACS knows us by AE title and host).
    """

    protocol: PacsProtocol = Field(
        description="'dicomweb' (QIDO-RS/WADO-RS over HTTP) or 'dimse' (C-FIND with "
        "C-GET or C-MOVE)"
    )
    url: str | None = Field(
        None,
        description="DICOMweb: the service root, e.g. https://pacs.example.org/dicom-web "
        "(no credentials in it)",
    )
    username: str | None = Field(
        None,
        max_length=256,
        description="DICOMweb: HTTP basic-auth user; the password is in "
        "password-file or password-env",
    )
    ca_file: str | None = Field(
        None,
        description="DICOMweb over https: CA bundle that signed the PACS's "
        "certificate (default: the system's)",
    )
    host: str | None = Field(
        None, max_length=255, description="DIMSE: the PACS's host name or address"
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="DIMSE: the PACS's DICOM port"
    )
    called_ae: AeTitle | None = Field(None, description="DIMSE: the PACS's AE title")
    calling_ae: AeTitle = Field(
        "WARDROUND",
        description="DIMSE: our AE title; the PACS must list it (with our host) to "
        "answer C-FIND and C-GET, and with move-port for C-MOVE",
    )
    retrieve: DimseRetrieve = Field(
        DimseRetrieve.C_GET,
        description="DIMSE: 'c-get' (instances come back on our association) or "
        "'c-move' (the PACS connects to a Storage SCP we run during the sync)",
    )
    move_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="C-MOVE: the port of our Storage SCP, as registered for "
        "calling-ae on the PACS",
    )
    move_bind: str = Field(
        "0.0.0.0",
        description="C-MOVE: the address our Storage SCP listens on while a sync "
        "runs (default: every interface, since the PACS is another host; it accepts "
        "stores only from the PACS host's addresses and only the instances asked for)",
    )
    timeout_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="seconds to wait for the PACS to connect or to answer a request",
    )
    study_timeout_s: float = Field(
        1800.0,
        gt=0.0,
        le=86_400.0,
        description="the most one study's fetch may take, however the PACS paces "
        "it; what arrived is kept and the rest is fetched at the next sync",
    )
    max_instances_per_study: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="a study listed with more instances is refused (a PACS that "
        "lists without end)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_url(cls, data: Any) -> Any:
        # Raised as ConfigError, not ValueError: pydantic would quote the section's
        # input, password included, in its message.
        url = data.get("url") if isinstance(data, dict) else None
        if isinstance(url, str) and "@" in urlsplit(url).netloc:
            raise ConfigError(
                "[data.pacs] url holds credentials (user:password@)",
                hint="Put the user in `username` and the password in a 0600 file "
                "named by `password-file` (or in `password-env`), and remove them "
                "from url.",
            )
        if isinstance(url, str) and (urlsplit(url).query or urlsplit(url).fragment):
            # a ?query may hold a token: refused here, before any message quotes it
            raise ConfigError(
                "[data.pacs] url must be the DICOMweb root, without ?query or #part",
                hint="Put credentials in username and password-file, never in url.",
            )
        if isinstance(url, str) and not _port_ok(url):
            raise ConfigError(
                "[data.pacs] url port must be 1-65535",
                hint="Write the port as digits after the host: "
                "https://pacs.example.org:8443/dicom-web",
            )
        return data

    @model_validator(mode="after")
    def _complete(self) -> PacsSection:
        problems = (
            _dicomweb_problems(self)
            if self.protocol is PacsProtocol.DICOMWEB
            else _dimse_problems(self)
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def describe(self) -> str:
        """The PACS as messages name it: its URL, or host:port and AE title."""
        if self.protocol is PacsProtocol.DICOMWEB:
            return f"the PACS at {self.url}"
        return f"the PACS {self.called_ae} at {self.host}:{self.port}"


def _port_ok(url: str) -> bool:
    """No port, or digits in 1-65535 (urllib raises on the rest only when asked)."""
    try:
        port = urlsplit(url).port
    except ValueError:  # not a number, or above 65535
        return False
    return port != 0


def _dicomweb_problems(section: PacsSection) -> list[str]:
    problems = []
    if not section.url:
        problems.append(
            "protocol 'dicomweb' needs url (the DICOMweb root, e.g. "
            "https://pacs.example.org/dicom-web)"
        )
    else:
        parts = urlsplit(section.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append("url must be an http:// or https:// address with a host")
        if parts.query or parts.fragment:
            problems.append("url must be the DICOMweb root, without ?query or #part")
    has_password = bool(section.password_file or section.password_env)
    if section.username and not has_password:
        problems.append("username needs password-file or password-env")
    if has_password and not section.username:
        problems.append("a password needs username (HTTP basic auth)")
    dimse_only = ("host", "port", "called_ae", "move_port")
    for name in dimse_only:
        if getattr(section, name) is not None:
            problems.append(f"{name.replace('_', '-')} is for protocol 'dimse'")
    return problems


def _dimse_problems(section: PacsSection) -> list[str]:
    problems = [
        f"protocol 'dimse' needs {name.replace('_', '-')} ({what})"
        for name, what in (
            ("host", "the PACS's host name or address"),
            ("port", "the PACS's DICOM port, often 104 or 11112"),
            ("called_ae", "the PACS's AE title"),
        )
        if getattr(section, name) is None
    ]
    if section.retrieve is DimseRetrieve.C_MOVE and section.move_port is None:
        problems.append(
            "retrieve 'c-move' needs move-port (our Storage SCP port, as the PACS "
            "has it registered for calling-ae)"
        )
    if section.retrieve is DimseRetrieve.C_GET and section.move_port is not None:
        problems.append("move-port is for retrieve 'c-move'")
    for name in ("url", "username", "ca_file", "password_file", "password_env"):
        if getattr(section, name) is not None:
            problems.append(
                f"{name.replace('_', '-')} is for protocol 'dicomweb' (DIMSE has no "
                "password: the PACS knows wardround by calling-ae and host)"
            )
    return problems
