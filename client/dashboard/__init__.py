"""The site operator's dashboard: check report, privacy ledger, approvals, what left, audit.

Served by ``wardround site start`` (``[dashboard]`` in site.toml; 127.0.0.1 by
default) and by ``wardround dashboard --site site.toml``. Read-only.
"""
