"""The web dashboards' shared parts: settings, serving, auth, charts and page chrome.

The coordinator's pages live in :mod:`wardround.server.dashboard`, the site's in
:mod:`wardround.client.dashboard`; neither imports the other.
"""
