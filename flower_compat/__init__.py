"""Everything wardround does to or through Flower's private internals.

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``) is used
directly everywhere; what reaches past it lives here, so that a Flower upgrade is a
change to this package (and its tests, ``tests/flower_compat/``) only:

- :mod:`.pacing`: shorter polling waits in the SuperNode and the ServerApp's Grid;
- :mod:`.prompt_grid`: a Grid that collects replies promptly;
- :mod:`.secagg_workflow`: one SecAgg+ training phase, bridged from the Message API
  to Flower's legacy workflow (the only place SecAgg+ exists in Flower 1.41);
- :mod:`.secagg_wire`: the masked vectors' narrower wire encoding.

Written against flwr 1.41 (``pyproject.toml`` pins ``flwr<1.42``).
"""
