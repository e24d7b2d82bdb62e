"""The site's dashboard as a Starlette app (read-only; see :mod:`wardround.dashboard.web`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...dashboard.pages import Renderer, shared_routes
from .metrics import metrics_text
from .state import SiteSource, floor_rows

HERE = Path(__file__).parent
NAV = [
    ("/check", "Check"),
    ("/privacy", "Privacy"),
    ("/approvals", "Approvals"),
    ("/sent", "What left"),
    ("/audit", "Audit"),
]


def build_app(source: SiteSource, exposure: Any, *, refresh_s: int = 5) -> Any:
    """The site's dashboard over ``source`` (a Starlette app behind the guard)."""
    from starlette.routing import Route

    from ...dashboard.web import make_app

    name = source.site.site.name
    renderer = Renderer(HERE / "templates", f"wardround site {name}", NAV, refresh_s)

    def check(request: Any) -> Any:
        from ..site_check import format_report

        report = source.check()
        return renderer.page(
            request,
            "check.html",
            "Site check",
            report=report,
            text=format_report(report),
        )

    def privacy(request: Any) -> Any:
        report = source.privacy()
        budget = report["budget_epsilon"]
        return renderer.page(
            request,
            "privacy.html",
            "Privacy ledger",
            live=True,
            report=report,
            remaining=budget - report["epsilon_total"],
            floor=floor_rows(source.site),
            max_epsilon=source.site.privacy.max_epsilon,
        )

    def approvals(request: Any) -> Any:
        return renderer.page(
            request, "approvals.html", "Approved runs", approvals=source.approvals()
        )

    def sent(request: Any) -> Any:
        return renderer.page(
            request,
            "sent.html",
            "What left the site",
            live=True,
            rows=source.egress(),
            allowed=list(source.site.answers.metrics),
            decimals=source.site.answers.decimals,
        )

    routes = [
        *shared_routes(
            renderer,
            exposure,
            home="/privacy",
            metrics=lambda: metrics_text(source),
            audit_paths=lambda: (source.audit_path,),
        ),
        Route("/check", check),
        Route("/privacy", privacy),
        Route("/approvals", approvals),
        Route("/sent", sent),
    ]
    return make_app(routes, exposure)


def site_exposure(site: Any, site_toml: Path) -> Any:
    """The dashboard's address and protection from ``site.toml``, checked."""
    from ...dashboard.web import check_exposure

    section = site.dashboard
    return check_exposure(
        f"{site_toml} [dashboard]",
        section.host,
        section.port,
        token_file=site.resolve(section.token_file) if section.token_file else None,
        certfile=site.resolve(section.certificate) if section.certificate else None,
        keyfile=site.resolve(section.private_key) if section.private_key else None,
    )


def start_site_dashboard(site: Any, site_toml: Path, report: dict[str, Any]) -> Any:
    """Serve the site's dashboard in a thread; None when it is disabled."""
    from ...dashboard.web import DashboardServer

    if not site.dashboard.enabled:
        return None
    exposure = site_exposure(site, site_toml)
    source = SiteSource(site=site, check=lambda: report)
    server = DashboardServer(
        build_app(source, exposure, refresh_s=site.dashboard.refresh_s),
        exposure,
        f"site {site.site.name}",
    )
    server.start()
    return server
