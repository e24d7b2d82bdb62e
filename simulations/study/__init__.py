"""The learning-quality study (``wardround study quality``).

Federated vs pooled vs local-only training on synthetic hospitals, with privacy,
secure-aggregation and modality ablations.
"""
