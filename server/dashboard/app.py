"""The coordinator's dashboard as a Starlette app (read-only; see :mod:`wardround.dashboard.web`)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ...dashboard.pages import Renderer, audit_page, metrics_response, zip_folder
from .metrics import metrics_text
from .state import (
    MANIFEST_NAME,
    CoordinatorSource,
    RunView,
    adapter_bytes,
    adapter_source,
    learning_series,
    privacy_rows,
    traffic_rows,
)

HERE = Path(__file__).parent
NAV = [
    ("/runs", "Runs"),
    ("/sites", "Sites"),
    ("/privacy", "Privacy"),
    ("/traffic", "Traffic"),
    ("/audit", "Audit"),
]
RUNS_SHOWN = 10  # privacy and traffic show the newest runs


class _ChartCache:
    """SVGs keyed by run, chart and the run's progress: drawn once per round."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: dict[tuple[str, str], tuple[tuple[Any, ...], str]] = {}

    def get(self, run: RunView, kind: str) -> str:
        key = (run.name, kind)
        stamp = (len(run.rounds), run.state)
        with self.lock:
            hit = self.items.get(key)
            if hit and hit[0] == stamp:
                return hit[1]
        svg = _draw(run, kind)
        with self.lock:
            self.items[key] = (stamp, svg)
        return svg


def _draw(run: RunView, kind: str) -> str:
    from ...dashboard.charts import bar_chart, line_chart

    if kind == "traffic":
        rounds, series = traffic_rows(run)
        size = adapter_bytes(run.path)
        return bar_chart(
            rounds,
            {site: [v / 1024 for v in values] for site, values in series.items()},
            title="Bytes sent per site",
            ylabel="KiB",
            reference=("global adapter" if size else "", size / 1024) if size else None,
        )
    auroc, loss = learning_series(run)
    if kind == "auroc":
        return line_chart(auroc, title="AUROC (macro)", ylabel="AUROC", ylim=(0, 1))
    return line_chart(loss, title="Validation loss", ylabel="loss")


def build_app(source: CoordinatorSource, exposure: Any, *, refresh_s: int = 5) -> Any:
    """The coordinator's dashboard over ``source`` (a Starlette app behind the guard)."""
    from starlette.responses import PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    from ...dashboard.web import make_app

    renderer = Renderer(HERE / "templates", "wardround coordinator", NAV, refresh_s)
    charts = _ChartCache()

    def not_found(what: str) -> Any:
        return PlainTextResponse(f"no {what} here", status_code=404)

    def home(request: Any) -> Any:
        return RedirectResponse("/runs", status_code=303)

    def runs(request: Any) -> Any:
        views = source.runs()
        return renderer.page(
            request,
            "runs.html",
            "Runs",
            live=any(r.live for r in views) or not views,
            runs=views,
            latest=views[0] if views else None,
        )

    def run(request: Any) -> Any:
        view = source.find_run(request.path_params["name"])
        if view is None:
            return not_found("such run")
        folder = adapter_source(view.path)
        return renderer.page(
            request,
            "run.html",
            f"Run {view.name}",
            live=view.live,
            run=view,
            adapter_folder=folder.name if folder else "",
        )

    def chart(request: Any) -> Any:
        kind = request.path_params["kind"]
        view = source.find_run(request.path_params["name"])
        if view is None or kind not in ("auroc", "loss", "traffic"):
            return not_found("such chart")
        return Response(charts.get(view, kind), media_type="image/svg+xml")

    def manifest(request: Any) -> Any:
        view = source.find_run(request.path_params["name"])
        name = request.path_params["file"]
        if view is None or not MANIFEST_NAME.fullmatch(name):
            return not_found("such manifest")
        path = view.path / "manifests" / name
        if not path.is_file():
            return not_found("such manifest")
        return Response(path.read_bytes(), media_type="application/json")

    def adapter(request: Any) -> Any:
        view = source.find_run(request.path_params["name"])
        folder = adapter_source(view.path) if view else None
        if view is None or folder is None:
            return not_found("adapter")
        return Response(
            zip_folder(folder),
            media_type="application/zip",
            headers={
                "content-disposition": f'attachment; filename="{view.name}-{folder.name}.zip"'
            },
        )

    def sites(request: Any) -> Any:
        from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

        return renderer.page(
            request,
            "sites.html",
            "Sites",
            live=source.site_status is not None,
            sites=source.sites(),
            live_status=source.site_status is not None,
            heartbeat_s=HEARTBEAT_DEFAULT_INTERVAL,
            patience=HEARTBEAT_PATIENCE,
        )

    def privacy(request: Any) -> Any:
        views = source.runs()[:RUNS_SHOWN]
        return renderer.page(
            request,
            "privacy.html",
            "Privacy",
            live=any(r.live for r in views),
            runs=[(v, privacy_rows(v)) for v in views],
        )

    def traffic(request: Any) -> Any:
        views = source.runs()[:RUNS_SHOWN]
        rows = []
        for view in views:
            rounds, series = traffic_rows(view)
            rows.append((view, rounds, series, adapter_bytes(view.path)))
        return renderer.page(
            request,
            "traffic.html",
            "Traffic",
            live=any(r.live for r in views),
            runs=rows,
        )

    def metrics(request: Any) -> Any:
        return metrics_response(metrics_text(source))

    def login(request: Any) -> Any:
        if exposure.token is None:  # nothing to sign in to
            return RedirectResponse("/", status_code=303)
        return renderer.page(request, "login.html", "Sign in")

    routes = [
        Route("/", home),
        Route("/runs", runs),
        Route("/runs/{name}", run),
        Route("/runs/{name}/chart/{kind}.svg", chart),
        Route("/runs/{name}/manifests/{file}", manifest),
        Route("/runs/{name}/adapter.zip", adapter),
        Route("/sites", sites),
        Route("/privacy", privacy),
        Route("/traffic", traffic),
        Route("/audit", audit_page(renderer, lambda: source.audit_paths)),
        Route("/metrics", metrics),
        Route("/login", login, methods=["GET", "POST"]),
    ]
    return make_app(routes, exposure)


def coordinator_source(config: Any) -> CoordinatorSource:
    """The running coordinator's files, and the SuperLink's view of its sites."""
    from ..registry import list_sites

    return CoordinatorSource(
        runs_root=config.runs_path,
        sites_path=config.sites_path,
        audit_paths=(config.audit_path,),
        site_status=lambda: list_sites(config),
    )


def coordinator_exposure(config: Any) -> Any:
    """The dashboard's address and protection from ``coordinator.toml``, checked.

    Off loopback it is served over TLS with the coordinator's own certificate.
    """
    from ...dashboard.web import check_exposure, is_loopback

    section = config.dashboard
    tls = not is_loopback(section.host)
    return check_exposure(
        f"{config.base_dir / 'coordinator.toml'} [dashboard]",
        section.host,
        section.port,
        token_file=config.dashboard_token_path,
        certfile=config.certificate_path if tls else None,
        keyfile=config.private_key_path if tls else None,
    )


def start_coordinator_dashboard(config: Any) -> Any:
    """Serve the coordinator's dashboard in a thread; None when it is disabled."""
    from ...dashboard.web import DashboardServer

    if not config.dashboard.enabled:
        return None
    exposure = coordinator_exposure(config)
    app = build_app(
        coordinator_source(config), exposure, refresh_s=config.dashboard.refresh_s
    )
    server = DashboardServer(app, exposure, "coordinator")
    server.start()
    return server
