"""The default note tokenizer: byte-level, needs no download, same at every site."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4)
def get_tokenizer(name_or_path: str = "byte") -> Any:
    """Return the tokenizer for the text encoder.

    ``"byte"`` is ByT5's byte-level tokenizer: no vocabulary file, identical
    everywhere. Anything else is a local path (or hub id) given to
    ``AutoTokenizer.from_pretrained``.
    """
    if name_or_path == "byte":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
