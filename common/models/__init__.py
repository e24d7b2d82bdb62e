"""Model families: a registry of builders that return a LoRA-wrapped model."""

from .registry import (
    BuiltModel,
    build_base_model,
    build_model,
    get_family,
    register_family,
)

__all__ = [
    "BuiltModel",
    "build_base_model",
    "build_model",
    "get_family",
    "register_family",
]
