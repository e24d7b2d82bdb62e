"""The coordinator: the Flower ServerApp, round loop, run directory, admin CLI."""
