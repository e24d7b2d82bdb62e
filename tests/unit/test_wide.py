"""The wide term and its features: hashed note n-grams, and the same model as a
sparse matrix for the classical reference."""

import numpy as np
import torch

from wardround.common.text import hash_note_ngrams
from wardround.models import build_model
from wardround.models.wide import WideTerm, bag_matrix


def test_an_ngram_hashes_to_the_same_bucket_in_every_note():
    ids = hash_note_ngrams(
        ["No pleural effusion.", "small pleural effusion", ""], 2**12, 16
    )
    assert ids.dtype == np.int64 and ids.shape == (3, 16)
    assert ((ids >= 0) & (ids < 2**12)).all()
    first, second = set(ids[0]) - {0}, set(ids[1]) - {0}
    # 'pleural', 'effusion' and 'pleural effusion' are in both; the negation
    # stays with its word in the bigram 'no pleural'
    assert len(first & second) == 3 and len(first) == 5 and len(second) == 5
    assert (ids[2] == 0).all()
    assert np.array_equal(
        ids,
        hash_note_ngrams(
            ["No pleural effusion.", "small pleural effusion", ""], 2**12, 16
        ),
    )


def test_a_long_note_keeps_the_ngrams_of_its_first_words():
    words = [f"word{i}" for i in range(100)]
    ids = hash_note_ngrams([" ".join(words)], 2**16, 20)[0]
    start = set(hash_note_ngrams([" ".join(words[:10])], 2**16, 20)[0]) - {0}
    end = set(hash_note_ngrams([" ".join(words[-10:])], 2**16, 20)[0]) - {0}
    assert set(ids) - {0} == start and not (set(ids) & end)


def test_the_sparse_features_give_the_wide_terms_logits():
    rng = np.random.default_rng(0)
    buckets, width, labels, n = 64, 5, 3, 7
    term = WideTerm(buckets, width, labels)
    with torch.no_grad():
        for p in term.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=p.shape).astype(np.float32)))
    ngrams = np.zeros((n, 6), np.int64)
    for row in range(n):
        k = rng.integers(0, 6)
        ngrams[row, :k] = rng.choice(np.arange(1, buckets), size=k, replace=False)
    ehr = rng.normal(size=(n, width)).astype(np.float32)
    present = (rng.random((n, 3)) < 0.7).astype(np.float32)

    logits = (
        term(torch.from_numpy(ehr), torch.from_numpy(ngrams), torch.from_numpy(present))
        .detach()
        .numpy()
    )
    matrix = bag_matrix(ngrams, ehr, present, buckets).toarray()
    weights = np.concatenate(
        [term.note.weight.detach().numpy(), term.ehr.weight.detach().numpy().T]
    )
    intercept = term.bias.weight.detach().numpy()[:, 0]
    assert np.allclose(logits, matrix @ weights + intercept, atol=1e-5)
    # a note's bag is L2-normalised; an absent note adds nothing
    norms = np.linalg.norm(matrix[:, :buckets], axis=1)
    has_note = (ngrams > 0).any(1) & (present[:, 2] > 0)
    assert np.allclose(norms[has_note], 1.0) and np.allclose(norms[~has_note], 0.0)


def test_the_wide_term_trains_and_can_be_turned_off(tiny_config):
    no_dp = tiny_config.with_overrides(privacy={"enabled": False})
    wide = build_model(no_dp).model
    plain = build_model(no_dp.with_overrides(model={"wide": False})).model
    private = build_model(
        tiny_config.with_overrides(
            privacy={"enabled": True}, model={"trainable": "auto"}
        )
    ).model

    def trained(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert any(".wide." in n for n in trained(wide))
    # the DP recipe's model trains it too, in full
    private_wide = {n for n in trained(private) if ".wide." in n}
    assert private_wide and all(".lora_" not in n for n in private_wide)
    assert not any(".wide." in n for n, _ in plain.named_parameters())
