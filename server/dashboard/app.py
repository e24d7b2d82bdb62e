"""The coordinator's dashboard as a Starlette app (read-only; see :mod:`wardround.dashboard.web`)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ...dashboard.pages import Renderer, shared_routes, zip_folder
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
        key = (run.key, kind)
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
        return line_chart(
            auroc,
            title="AUROC (macro)",
            ylabel="AUROC",
            ylim=(0, 1),
            emphasised=run.scored,
        )
    return line_chart(
        loss, title="Validation loss", ylabel="loss", emphasised=run.scored
    )


def _not_found(what: str) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(f"no {what} here", status_code=404)


class _Pages:
    """The coordinator's own pages over one source (the shared ones: ``pages``)."""

    def __init__(self, source: CoordinatorSource, renderer: Renderer) -> None:
        self.source = source
        self.renderer = renderer
        self.charts = _ChartCache()

    def runs(self, request: Any) -> Any:
        views = self.source.runs()
        return self.renderer.page(
            request,
            "runs.html",
            "Runs",
            live=any(r.live for r in views) or not views,
            runs=views,
            latest=views[0] if views else None,
        )

    def run(self, request: Any) -> Any:
        view = self.source.find_run(request.path_params["name"])
        if view is None:
            return _not_found("such run")
        folder = adapter_source(view.path)
        return self.renderer.page(
            request,
            "run.html",
            f"Run {view.name}",
            live=view.live,
            run=view,
            adapter_folder=folder.name if folder else "",
        )

    def chart(self, request: Any) -> Any:
        from starlette.responses import Response

        kind = request.path_params["kind"]
        view = self.source.find_run(request.path_params["name"])
        if view is None or kind not in ("auroc", "loss", "traffic"):
            return _not_found("such chart")
        return Response(self.charts.get(view, kind), media_type="image/svg+xml")

    def manifest(self, request: Any) -> Any:
        from starlette.responses import Response

        view = self.source.find_run(request.path_params["name"])
        name = request.path_params["file"]
        if view is None or not MANIFEST_NAME.fullmatch(name):
            return _not_found("such manifest")
        path = view.path / "manifests" / name
        if not path.is_file():
            return _not_found("such manifest")
        return Response(path.read_bytes(), media_type="application/json")

    def adapter(self, request: Any) -> Any:
        from starlette.responses import Response

        view = self.source.find_run(request.path_params["name"])
        folder = adapter_source(view.path) if view else None
        if view is None or folder is None:
            return _not_found("adapter")
        return Response(
            zip_folder(folder),
            media_type="application/zip",
            headers={
                "content-disposition": f'attachment; filename="{view.name}-{folder.name}.zip"'
            },
        )

    def sites(self, request: Any) -> Any:
        from ...flower_compat.constants import (
            HEARTBEAT_DEFAULT_INTERVAL,
            HEARTBEAT_PATIENCE,
        )

        live = self.source.site_status is not None
        return self.renderer.page(
            request,
            "sites.html",
            "Sites",
            live=live,
            sites=self.source.sites(),
            live_status=live,
            heartbeat_s=HEARTBEAT_DEFAULT_INTERVAL,
            patience=HEARTBEAT_PATIENCE,
        )

    def privacy(self, request: Any) -> Any:
        views = self.source.runs()[:RUNS_SHOWN]
        return self.renderer.page(
            request,
            "privacy.html",
            "Privacy",
            live=any(r.live for r in views),
            runs=[(v, privacy_rows(v)) for v in views],
        )

    def traffic(self, request: Any) -> Any:
        views = self.source.runs()[:RUNS_SHOWN]
        rows = []
        for view in views:
            rounds, series = traffic_rows(view)
            rows.append((view, rounds, series, adapter_bytes(view.path)))
        return self.renderer.page(
            request,
            "traffic.html",
            "Traffic",
            live=any(r.live for r in views),
            runs=rows,
        )


def build_app(source: CoordinatorSource, exposure: Any, *, refresh_s: int = 5) -> Any:
    """The coordinator's dashboard over ``source`` (a Starlette app behind the guard)."""
    from starlette.routing import Route

    from ...dashboard.web import make_app

    renderer = Renderer(HERE / "templates", "wardround coordinator", NAV, refresh_s)
    pages = _Pages(source, renderer)
    routes = [
        *shared_routes(
            renderer,
            exposure,
            home="/runs",
            metrics=lambda: metrics_text(source),
            audit_paths=lambda: source.audit_paths,
        ),
        Route("/runs", pages.runs),
        Route("/runs/{name}", pages.run),
        Route("/runs/{name}/chart/{kind}.svg", pages.chart),
        Route("/runs/{name}/manifests/{file}", pages.manifest),
        Route("/runs/{name}/adapter.zip", pages.adapter),
        Route("/sites", pages.sites),
        Route("/privacy", pages.privacy),
        Route("/traffic", pages.traffic),
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
