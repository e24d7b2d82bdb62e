"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

The coordinator only sends the proximal weight μ: each site adds
``μ/2 · ||w - w_global||²`` to its local loss (:mod:`wardround.client.proximal`).
Aggregation is FedAvg's.
"""

from __future__ import annotations

from typing import Any

from ...common import wire
from ...common.config import FederationConfig, Strategy
from .fedavg import FedAvg


class FedProx(FedAvg):
    r"""FedAvg whose train messages carry ``proximal-mu``.

    Sites minimise :math:`F_k(w) + \frac{\mu}{2}\lVert w - w^t \rVert^2`; the
    coordinator averages their deltas as FedAvg does.
    """

    kind = Strategy.FEDPROX

    def __init__(self, federation: FederationConfig) -> None:
        super().__init__(federation)
        self.proximal_mu = federation.proximal_mu

    def train_settings(self) -> dict[str, Any]:
        """``proximal-mu``: the key Flower's own FedProx sends."""
        return {wire.PROXIMAL_MU: self.proximal_mu}
