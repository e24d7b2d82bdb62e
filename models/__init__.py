"""Model families: a registry of each family's config, builder, objective and data."""

from .registry import (
    FAMILIES,
    BuiltModel,
    ModelFamily,
    build_base_model,
    build_model,
    family_of,
    get_family,
    register_family,
)

__all__ = [
    "FAMILIES",
    "BuiltModel",
    "ModelFamily",
    "family_of",
    "build_base_model",
    "build_model",
    "get_family",
    "register_family",
]
