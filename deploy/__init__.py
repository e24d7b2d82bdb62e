"""Deployment tooling: TLS certificates and SuperNode authentication keys."""
