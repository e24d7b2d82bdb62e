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


#: Word n-grams hashed for the notes' bag-of-n-grams features (unigrams and bigrams:
#: a bigram keeps a negation with its word, "no effusion").
NGRAM_RANGE = (1, 2)


@lru_cache(maxsize=4)
def _ngram_vectorizer(buckets: int) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    # Hashing, not a vocabulary: no site's text decides the features, and every site
    # maps an n-gram to the same bucket. Bucket 0 is kept for padding.
    return HashingVectorizer(
        analyzer="word",
        ngram_range=NGRAM_RANGE,
        n_features=buckets - 1,
        alternate_sign=False,
        binary=True,
        norm=None,
        lowercase=True,
    )


def hash_note_ngrams(notes: list[str], buckets: int, max_ngrams: int) -> Any:
    """Each note's distinct hashed word n-grams as bucket ids, int64 [n, max_ngrams].

    Ids are 1..buckets-1; 0 pads. A note longer than ``max_ngrams`` n-grams allow
    keeps its first words (two n-grams per word at most: the word and a bigram).
    """
    import numpy as np

    vectorizer = _ngram_vectorizer(buckets)
    words = vectorizer.build_tokenizer()
    keep = max(1, (max_ngrams + 1) // 2)
    texts = []
    for note in notes:
        tokens = words(note or "")
        texts.append(" ".join(tokens[:keep]) if len(tokens) > keep else note or "")
    matrix = vectorizer.transform(texts).tocsr()
    out = np.zeros((len(notes), max_ngrams), np.int64)
    for row in range(len(notes)):
        ids = matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]
        ids = np.sort(ids)[:max_ngrams]
        out[row, : len(ids)] = ids + 1
    return out
