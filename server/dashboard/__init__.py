"""The coordinator admin's dashboard: runs, sites, privacy, traffic, audit and /metrics.

Served by ``wardround coordinator start`` (``[dashboard]`` in coordinator.toml) and by
``wardround dashboard`` over a run directory. It reads the coordinator's state
folder; it changes nothing.
"""
