"""Serving a read-only dashboard: who may reach it, on which address, with what TLS.

The rules (issue 17, DESIGN.md "who the site trusts"):

- loopback by default; any other bind address is an explicit setting, and then the
  dashboard needs TLS (the daemon's own certificate and key) *and* a token;
- read-only: GET and HEAD only (plus ``POST /login``, which only sets a cookie);
- a token, when set, is asked of every page and of ``/metrics`` (``Authorization:
  Bearer TOKEN``, or the cookie ``/login`` sets);
- everything is served from the package: the pages allow no other origin (CSP);
- on loopback, only requests addressed to a loopback name are answered, so that a web
  page whose name its owner points at 127.0.0.1 (DNS rebinding) cannot read it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..common.errors import ConfigError, FederationError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
COOKIE = "wardround_dashboard"
READ_METHODS = frozenset({"GET", "HEAD"})
SECURITY_HEADERS = {
    # nothing from another origin: no CDN, no inline script
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'none'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Exposure:
    """Where a dashboard listens and how it is protected, resolved and checked."""

    host: str
    port: int
    token: str | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    @property
    def tls(self) -> bool:
        """Served over HTTPS."""
        return self.certfile is not None

    @property
    def url(self) -> str:
        """The dashboard's address as a browser on this host would open it."""
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"


def read_token(path: Path, where: str) -> str:
    """The token in ``path`` (one line, 0600, at least 32 characters)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{where} token-file {path} does not exist",
            hint=f"Create one: `python -c 'import secrets; print(secrets.token_urlsafe(32))' "
            f"> {path} && chmod 600 {path}`.",
        )
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            f"{where} token-file {path} is readable by other users",
            hint=f"Run `chmod 600 {path}`.",
        )
    token = path.read_text().strip()
    if len(token) < 32 or any(c.isspace() for c in token):
        raise ConfigError(
            f"{where} token-file {path} must hold one token of at least 32 characters",
            hint="Write a fresh one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`.",
        )
    return token


def check_exposure(
    where: str,
    host: str,
    port: int,
    *,
    token_file: Path | None,
    certfile: Path | None,
    keyfile: Path | None,
) -> Exposure:
    """Resolve a dashboard's settings; a non-loopback host needs TLS and a token.

    ``where`` names the config section in messages (``coordinator.toml [dashboard]``).
    """
    token = read_token(token_file, where) if token_file else None
    if not is_loopback(host):
        missing = [
            what
            for what, value in (("token-file", token), ("TLS", certfile and keyfile))
            if not value
        ]
        if missing:
            raise ConfigError(
                f"{where} host = {host!r} is not a loopback address, and the "
                f"dashboard then needs {' and '.join(missing)}",
                hint='Keep host = "127.0.0.1" (reach it over an SSH tunnel), or set '
                "token-file and the TLS files (see deploy/README.md, 'Dashboards').",
            )
    for what, path in (("certificate", certfile), ("private key", keyfile)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{where} TLS {what} {path} does not exist")
    return Exposure(
        host=host,
        port=port,
        token=token,
        certfile=Path(certfile) if certfile else None,
        keyfile=Path(keyfile) if keyfile else None,
    )


def addressed_to_loopback(host_header: str | None) -> bool:
    """Whether a request's ``Host`` names this machine's loopback (any port).

    A browser always sends ``Host``; a request without one did not come from a web
    page, so it passes. Starlette's ``TrustedHostMiddleware`` cannot be used: it cuts
    ``[::1]:9095`` at the first colon.
    """
    if host_header is None:
        return True
    try:
        name = urlsplit(f"//{host_header}").hostname
    except ValueError:
        return False
    return name is not None and is_loopback(name)


class Guard:
    """ASGI middleware: the Host, read-only methods, the token, the security headers."""

    def __init__(self, app: Any, token: str | None, *, loopback: bool = True) -> None:
        self.app = app
        self.token = token
        # bound to loopback: answer only requests addressed to it (DNS rebinding)
        self.loopback = loopback

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[..., Any],
        send: Callable[..., Any],
    ) -> None:
        """Refuse writes and callers without the token; add the headers."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, RedirectResponse

        request = Request(scope, receive)
        path = scope.get("path", "")

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                ]
                message = {**message, "headers": headers}
            await send(message)

        if self.loopback and not addressed_to_loopback(request.headers.get("host")):
            await PlainTextResponse(
                "this dashboard listens on loopback and answers only requests "
                "addressed to 127.0.0.1, [::1] or localhost: open it as "
                "http://127.0.0.1:PORT/ (over an SSH tunnel from another machine)",
                status_code=421,
            )(scope, receive, send_with_headers)
            return
        if path == "/login" and self.token is not None:
            if request.method == "POST":
                form = parse_qs((await request.body()).decode(errors="replace"))
                given = (form.get("token") or [""])[0]
                if self._matches(given):
                    response = RedirectResponse("/", status_code=303)
                    response.set_cookie(
                        COOKIE,
                        given,
                        httponly=True,
                        secure=scope.get("scheme") == "https",
                        samesite="strict",
                    )
                    await response(scope, receive, send_with_headers)
                    return
            await self.app(scope, receive, send_with_headers)
            return
        if request.method not in READ_METHODS:
            await PlainTextResponse(
                "the dashboard is read-only: admin actions stay on the command line",
                status_code=405,
                headers={"allow": "GET, HEAD"},
            )(scope, receive, send_with_headers)
            return
        if self.token is not None and not self._allowed(request):
            if path == "/metrics" or path.startswith("/static/"):
                await PlainTextResponse("a bearer token is required", status_code=401)(
                    scope, receive, send_with_headers
                )
            else:
                await RedirectResponse("/login", status_code=303)(
                    scope, receive, send_with_headers
                )
            return
        await self.app(scope, receive, send_with_headers)

    def _matches(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            given.encode(), self.token.encode()
        )

    def _allowed(self, request: Any) -> bool:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and self._matches(header[7:].strip()):
            return True
        return self._matches(request.cookies.get(COOKIE, ""))


def template_environment(*folders: Path) -> Any:
    """A Jinja2 environment over ``folders`` and the shared templates, autoescaped."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*map(str, folders), str(TEMPLATES)]),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = format_number
    env.filters["bytes"] = format_bytes
    env.filters["when"] = format_time
    env.filters["short"] = lambda value: f"{float(value):.6g}"
    return env


def format_time(value: Any) -> str:
    """A Unix time as UTC ``YYYY-MM-DD HH:MM:SS``."""
    from datetime import UTC, datetime

    try:
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "–"


def format_number(value: Any, digits: int = 3) -> str:
    """A number for a table cell; '–' when there is none."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:  # NaN
        return "–"
    return f"{number:.{digits}f}"


def format_bytes(value: Any) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop returns


def make_app(routes: list[Any], exposure: Exposure) -> Any:
    """A Starlette app of ``routes`` plus ``/static``, behind :class:`Guard`."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    app = Starlette(
        routes=[*routes, Mount("/static", StaticFiles(directory=STATIC), name="static")]
    )
    return Guard(app, exposure.token, loopback=is_loopback(exposure.host))


class DashboardServer:
    """uvicorn in a thread of the daemon; :meth:`stop` ends it."""

    def __init__(self, app: Any, exposure: Exposure, what: str) -> None:
        import uvicorn

        self.exposure = exposure
        self.what = what
        config = uvicorn.Config(
            app,
            host=exposure.host,
            port=exposure.port,
            ssl_certfile=str(exposure.certfile) if exposure.certfile else None,
            ssl_keyfile=str(exposure.keyfile) if exposure.keyfile else None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            # a browser's open keep-alive connection must not hold up the daemon
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, name=f"{what}-dashboard", daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> None:
        """Start serving; FederationError when the port cannot be had."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise FederationError(
                    f"the {self.what} dashboard could not listen on "
                    f"{self.exposure.host}:{self.exposure.port}",
                    hint="Stop what listens there, or set [dashboard] port (or "
                    "enabled = false).",
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop serving (open connections get 2 s) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=5)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=5)
