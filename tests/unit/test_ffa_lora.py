"""FFA-LoRA: A frozen at its shared init, B trains; aggregation becomes exact."""

import numpy as np

from wardround.common.adapter import adapter_state, payload_keys
from wardround.common.config import RunConfig
from wardround.models import build_model

# LoRA on the encoders' square attention projections, where A and B are equal in size.
ENCODER_LORA = {"trainable": "all", "base": "random"}


def test_ffa_freezes_every_lora_a_and_sends_half_the_lora_tensors():
    plain = build_model(RunConfig().with_overrides(model=ENCODER_LORA))
    ffa = build_model(
        RunConfig().with_overrides(model={**ENCODER_LORA, "lora_variant": "ffa"})
    )
    assert plain.base_fingerprint == ffa.base_fingerprint  # same base model
    frozen = [n for n, p in ffa.model.named_parameters() if ".lora_A." in n]
    assert frozen and all(
        not p.requires_grad for n, p in ffa.model.named_parameters() if n in frozen
    )
    state = adapter_state(ffa.model)
    sent = payload_keys(state, frozen_lora_a=True)
    lora_all = [k for k in state if ".lora_" in k]
    lora_sent = [k for k in sent if ".lora_" in k]
    assert 2 * sum(state[k].size for k in lora_sent) == sum(
        state[k].size for k in lora_all
    )
    # the same init: A is identical at every site and the coordinator
    again = adapter_state(
        build_model(
            RunConfig().with_overrides(model={**ENCODER_LORA, "lora_variant": "ffa"})
        ).model
    )
    assert all(np.array_equal(state[k], again[k]) for k in state if ".lora_A." in k)


def test_ffa_aggregation_is_exact_and_plain_lora_is_not():
    rng = np.random.default_rng(0)
    a_shared = rng.normal(size=(4, 16))
    bs = [rng.normal(size=(16, 4)) for _ in range(3)]
    as_ = [a_shared + rng.normal(scale=0.3, size=(4, 16)) for _ in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    # FFA-LoRA: averaging B with A fixed gives exactly the average of the products
    ffa_update = sum(wi * b for wi, b in zip(w, bs, strict=True)) @ a_shared
    ffa_target = sum(wi * (b @ a_shared) for wi, b in zip(w, bs, strict=True))
    np.testing.assert_allclose(ffa_update, ffa_target, atol=1e-12)
    # LoRA: FedAvg of A and B separately is not the average of B·A
    lora_update = sum(wi * b for wi, b in zip(w, bs, strict=True)) @ sum(
        wi * a for wi, a in zip(w, as_, strict=True)
    )
    lora_target = sum(wi * (b @ a) for wi, b, a in zip(w, bs, as_, strict=True))
    assert np.abs(lora_update - lora_target).max() > 1e-2
