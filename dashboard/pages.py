"""Page helpers both dashboards share: rendering, the audit page, /metrics, zips."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_SHOWN_KEYS = frozenset(
    {"seq", "time", "actor", "event", "run_id", "site", "prev", "hmac", "sha256"}
)


def audit_details(entry: dict[str, Any]) -> str:
    """An audit event's other fields as ``key=value`` text."""
    return " ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}"
        for k, v in entry.items()
        if k not in _SHOWN_KEYS
    )


class Renderer:
    """Renders a page of one dashboard with its navigation and refresh."""

    def __init__(
        self, folder: Path, product: str, nav: list[tuple[str, str]], refresh_s: int
    ) -> None:
        from starlette.templating import Jinja2Templates

        from wardround import __version__

        from .web import template_environment

        self.templates = Jinja2Templates(env=template_environment(folder))
        self.product = product
        self.nav = nav
        self.refresh_s = refresh_s
        self.version = __version__

    def page(
        self, request: Any, name: str, title: str, *, live: bool = False, **context: Any
    ) -> Any:
        """The page ``name`` (a template), refreshing itself while ``live``."""
        active = "/" + request.url.path.strip("/").split("/")[0]
        if active == "/":
            active = self.nav[0][0]
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "title": title,
                "product": self.product,
                "nav": self.nav,
                "active": active,
                "refresh": self.refresh_s if live and self.refresh_s else None,
                "version": self.version,
                "details": audit_details,
                **context,
            },
        )


def audit_page(
    renderer: Renderer, paths: Callable[[], tuple[Path, ...]], limit: int = 500
) -> Callable[[Any], Any]:
    """The audit page: merged events, filterable, with each log's verification."""
    from ..ops.audit import AuditEvent

    def endpoint(request: Any) -> Any:
        query = request.query_params
        filters = {k: query.get(k, "")[:100] for k in ("run", "site", "event")}
        events, checks = audit_view(paths(), limit=limit, **filters)
        return renderer.page(
            request,
            "audit.html",
            "Audit",
            events=events,
            checks=checks,
            filters=filters,
            events_known=[e.value for e in AuditEvent],
            limit=limit,
        )

    return endpoint


def shared_routes(
    renderer: Renderer,
    exposure: Any,
    *,
    home: str,
    metrics: Callable[[], bytes],
    audit_paths: Callable[[], tuple[Path, ...]],
) -> list[Any]:
    """The routes both dashboards serve alike: home, audit, ``/metrics``, sign-in."""
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    def to_home(request: Any) -> Any:
        return RedirectResponse(home, status_code=303)

    def metrics_endpoint(request: Any) -> Any:
        return metrics_response(metrics())

    def login(request: Any) -> Any:
        if exposure.token is None:  # nothing to sign in to
            return RedirectResponse("/", status_code=303)
        return renderer.page(request, "login.html", "Sign in")

    return [
        Route("/", to_home),
        Route("/audit", audit_page(renderer, audit_paths)),
        Route("/metrics", metrics_endpoint),
        Route("/login", login, methods=["GET", "POST"]),
    ]


def metrics_response(text: bytes) -> Any:
    """A Prometheus text-format response."""
    from starlette.responses import Response

    return Response(text, media_type=PROMETHEUS_TEXT)


def zip_folder(folder: Path) -> bytes:
    """A folder's files (not links, not subfolders' links) as a zip archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def audit_view(
    paths: tuple[Path, ...],
    *,
    run: str | None = None,
    site: str | None = None,
    event: str | None = None,
    limit: int = 500,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The logs' events merged by time and filtered (newest first), and each log's check."""
    from ..common.errors import WardroundError
    from ..ops.audit import (
        AuditEvent,
        filter_events,
        merge_by_time,
        read_audit,
        verify_audit,
    )

    checks: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for path in paths:
        if not Path(path).is_file():
            checks.append({"log": str(path), "ok": None, "detail": "no log yet"})
            continue
        try:
            events.extend(read_audit(path))
            verdict = verify_audit(path)
            detail = (
                f"{verdict.lines} line(s), keyed chain intact"
                if verdict.ok
                else f"line {verdict.first_bad_line}: {verdict.problem}"
                if verdict.first_bad_line
                else str(verdict.problem)
            )
            checks.append({"log": str(path), "ok": verdict.ok, "detail": detail})
        except WardroundError as exc:
            checks.append({"log": str(path), "ok": False, "detail": exc.message})
    known = {e.value for e in AuditEvent}
    shown = filter_events(
        merge_by_time(events),
        run=run or None,
        site=site or None,
        event=event if event in known else None,
    )
    return list(reversed(shown))[:limit], checks
