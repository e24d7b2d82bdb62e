"""The ``vlm`` family's models: tiny models of four architectures, LoRA targets,
DP compatibility (exact per-example gradients), training and loading from a folder.

Prompts, the answer-only loss and the family's config: test_vlm_prompts.py.
"""

import numpy as np
import pytest
import torch
from vlm_cases import ARCHS, IMAGE, QUESTION, vlm_config

from wardround.common.config import RunConfig, TaskConfig, VlmTower
from wardround.common.errors import ConfigError
from wardround.common.vlm_prompts import (
    PromptFormat,
    encode_example,
)
from wardround.models import build_base_model, build_model
from wardround.models.vlm import lora_targets, tower_of
from wardround.models.vlm_tiny import build_tiny_vlm, save_tiny_vlm


@pytest.mark.parametrize(
    ("arch", "vision", "projector", "text"),
    [
        (
            "llava",
            "model.vision_tower.",
            "model.multi_modal_projector.",
            "model.language_model.",
        ),
        (
            "paligemma",
            "model.vision_tower.",
            "model.multi_modal_projector.",
            "model.language_model.",
        ),
        ("idefics3", "model.vision_model.", "model.connector.", "model.text_model."),
        (
            "qwen2-vl",
            "model.visual.blocks",
            "model.visual.merger.",
            "model.language_model.",
        ),
    ],
)
def test_lora_targets_follow_the_chosen_towers(arch, vision, projector, text):
    model, _ = build_tiny_vlm(arch)
    every = lora_targets(model, tuple(VlmTower))
    only_text = lora_targets(model, (VlmTower.TEXT,))

    assert only_text and all(t.startswith(text) for t in only_text)
    assert any(t.startswith(vision) for t in every)
    assert any(t.startswith(projector) for t in every)
    assert "lm_head" not in every
    assert tower_of("model.visual.merger.mlp.0", "qwen2_vl") is VlmTower.PROJECTOR


def test_qwen2_vl_vision_lora_is_refused_under_dp_and_the_text_tower_offered():
    config = vlm_config("qwen2-vl", lora_towers=["vision", "text"])

    with pytest.raises(ConfigError, match="packs all images") as refused:
        build_model(config)

    assert 'lora-towers = ["text"]' in refused.value.hint
    # the same towers train without DP, and the text tower alone with DP
    build_model(config.with_overrides(privacy={"enabled": False}))
    assert build_model(vlm_config("qwen2-vl")).family == "vlm"


def _perturb_lora_b(model, seed=0):
    # At init every lora_B is zero, so every lora_A gradient is zero too and a
    # comparison of per-example gradients passes whatever Opacus computes.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def test_qwen2_vl_text_tower_gets_exact_per_example_gradients_under_opacus():
    from opacus import GradSampleModule

    from wardround.client.vlm_objective import VlmObjective

    built = build_model(vlm_config("qwen2-vl"))
    _perturb_lora_b(built.model)
    processor = built.processor
    fmt = PromptFormat.of(processor)
    objective = VlmObjective.create(
        processor, TaskConfig(kind="vqa"), max_new_tokens=4, generations=0
    )
    items = []
    for k, answer in enumerate(("yes", "no, not at all")):
        example = encode_example(
            processor, fmt, IMAGE, QUESTION, answer, max_tokens=256
        )
        item = {
            key: torch.as_tensor(v)
            for key, v in example.items()
            if key != "prompt_length"
        }
        items.append(
            item
            | {
                "prompt_length": torch.tensor(0),
                "findings": torch.zeros(4),
                "index": torch.tensor(k),
            }
        )
    trainable = {n: p for n, p in built.model.named_parameters() if p.requires_grad}
    wrapped = GradSampleModule(built.model)

    objective.loss(wrapped, objective.collate(items), torch.Generator()).backward()
    batched = {n: p.grad_sample.clone() for n, p in trainable.items()}
    alone = []
    for item in items:
        wrapped.zero_grad(set_to_none=True)
        for p in built.model.parameters():
            p.grad_sample = None
        objective.loss(
            wrapped,
            objective.collate([item | {"index": torch.tensor(0)}]),
            torch.Generator(),
        ).backward()
        alone.append({n: p.grad_sample[0].clone() for n, p in trainable.items()})
    wrapped._close()

    # every LoRA factor of the text tower (A and B, every layer), not only the first
    assert len(trainable) >= 8
    assert {n.rsplit(".lora_", 1)[1][0] for n in trainable} == {"A", "B"}
    for k, expected in enumerate(alone):
        for name, grad in expected.items():
            assert grad.abs().max() > 0, f"{name}: zero gradient for example {k}"
            torch.testing.assert_close(
                batched[name][k],
                grad,
                atol=1e-6,
                rtol=1e-4,
                msg=lambda text, name=name: f"{name}: {text}",
            )


def test_a_tiny_model_saved_to_a_folder_loads_like_a_downloaded_one(tmp_path):
    save_tiny_vlm("paligemma", tmp_path / "pg")
    from_folder = build_model(
        RunConfig().with_overrides(
            model={"family": "vlm", "path": str(tmp_path / "pg")}, task={"kind": "vqa"}
        )
    )
    in_memory = build_model(vlm_config("paligemma"))

    # same weights, config and prompt format: the same base model to the federation
    assert from_folder.base_fingerprint == in_memory.base_fingerprint
    assert type(from_folder.processor).__name__ == "PaliGemmaProcessor"
    with pytest.raises(ConfigError, match="cannot load the vision-language model"):
        build_model(
            RunConfig().with_overrides(
                model={"family": "vlm", "path": str(tmp_path / "none")},
                task={"kind": "vqa"},
            )
        )


def test_qwen2_vl_processor_loads_from_a_folder_without_torchvision(tmp_path):
    from wardround.models.vlm_processor import load_processor

    save_tiny_vlm("qwen2-vl", tmp_path / "qwen")
    processor = load_processor(str(tmp_path / "qwen"))
    _, original = build_tiny_vlm("qwen2-vl")

    assert type(processor).__name__ == "Qwen2VLProcessor"
    fmt = PromptFormat.of(processor)
    a = encode_example(processor, fmt, IMAGE, QUESTION, "yes", max_tokens=256)
    b = encode_example(
        original, PromptFormat.of(original), IMAGE, QUESTION, "yes", max_tokens=256
    )
    assert np.array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_allclose(a["pixel_values"], b["pixel_values"])


def test_adapter_round_trip_through_peft_from_pretrained(tmp_path):
    from peft import PeftModel

    from wardround.common.adapter import adapter_state
    from wardround.models.adapter_files import save_peft_adapter

    config = vlm_config("llava")
    built = build_model(config)
    rng = np.random.default_rng(0)
    changed = {
        k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in adapter_state(built.model).items()
    }
    save_peft_adapter(built.model, changed, tmp_path / "adapter")

    base, fingerprint = build_base_model(config)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))

    assert fingerprint == built.base_fingerprint
    reloaded = adapter_state(loaded)
    assert all(np.array_equal(reloaded[k], changed[k]) for k in changed)
    example = encode_example(
        built.processor,
        PromptFormat.of(built.processor),
        IMAGE,
        QUESTION,
        "yes",
        max_tokens=128,
    )
    inputs = {
        "input_ids": torch.as_tensor(example["input_ids"])[None],
        "pixel_values": torch.as_tensor(example["pixel_values"]),
    }
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(**inputs).logits, built.model.eval()(**inputs).logits
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_family_trains_and_generates_on_cpu(arch):
    built = build_model(vlm_config(arch, dp=False))
    processor = built.processor
    fmt = PromptFormat.of(processor)
    example = encode_example(processor, fmt, IMAGE, QUESTION, "yes", max_tokens=256)
    from wardround.client.vlm_objective import VlmObjective

    objective = VlmObjective.create(
        processor, TaskConfig(kind="vqa"), max_new_tokens=3, generations=1
    )
    item = {k: torch.as_tensor(v) for k, v in example.items()} | {
        "findings": torch.zeros(4),
        "index": torch.tensor(0),
    }
    optimizer = torch.optim.AdamW(
        [p for p in built.model.parameters() if p.requires_grad], lr=0.01
    )
    batch = objective.collate([item])
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = objective.loss(built.model.train(), batch, torch.Generator())
        loss.backward()
        optimizer.step()
        losses.append(float(loss))

    assert losses[-1] < losses[0]
    from wardround.sitedata.vlm_dataset import VlmDataset

    samples = objective.generate_samples(
        built.model.eval(), VlmDataset([item], ["q"], ["yes"]), torch.device("cpu")
    )
    assert len(samples) == 1 and isinstance(samples[0]["generated"], str)


def test_bf16_base_and_gradient_checkpointing_train_on_cpu():
    from wardround.client.vlm_objective import VlmObjective

    plain = vlm_config("llava", dp=False)
    built = build_model(
        vlm_config("llava", dp=False, dtype="bfloat16", gradient_checkpointing=True)
    )
    reference = build_model(plain)
    frozen = [p for p in built.model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    assert all(
        p.dtype == torch.float32 for p in built.model.parameters() if p.requires_grad
    )
    processor = built.processor
    example = encode_example(
        processor, PromptFormat.of(processor), IMAGE, QUESTION, "yes", max_tokens=128
    )
    item = {k: torch.as_tensor(v) for k, v in example.items()} | {
        "findings": torch.zeros(4),
        "index": torch.tensor(0),
    }
    objective = VlmObjective.create(
        processor, TaskConfig(kind="vqa"), max_new_tokens=3, generations=0
    )
    batch = objective.collate([item])

    loss = objective.loss(built.model.train(), batch, torch.Generator())
    loss.backward()
    reference_loss = objective.loss(reference.model.train(), batch, torch.Generator())

    assert torch.isfinite(loss) and abs(float(loss) - float(reference_loss)) < 0.05
    assert all(p.grad is not None for p in built.model.parameters() if p.requires_grad)
    assert built.base_fingerprint == reference.base_fingerprint  # bf16 and fp32 agree


def test_dp_sgd_trains_lora_on_a_bfloat16_base():
    from wardround.client.dp import DpTraining
    from wardround.client.trainer import LocalTrainSpec, train_local
    from wardround.client.vlm_objective import VlmObjective
    from wardround.common.adapter import adapter_state
    from wardround.common.config import GradSampleMode
    from wardround.sitedata.vlm_dataset import VlmDataset

    built = build_model(vlm_config("llava", dtype="bfloat16"))
    fmt = PromptFormat.of(built.processor)
    items = []
    for k, answer in enumerate(["yes", "no"] * 4):
        example = encode_example(
            built.processor, fmt, IMAGE, QUESTION, answer, max_tokens=128
        )
        items.append(
            {key: torch.as_tensor(v) for key, v in example.items()}
            | {"findings": torch.zeros(4), "index": torch.tensor(k)}
        )
    objective = VlmObjective.create(
        built.processor, TaskConfig(kind="vqa"), max_new_tokens=3, generations=0
    )
    before = adapter_state(built.model)

    outcome = train_local(
        built.model,
        # four patients of two studies each: DP samples patients, one study each
        VlmDataset(items, ["q"] * 8, ["a"] * 8, np.arange(8) // 2),
        LocalTrainSpec(1, 0, 2, 0.01, 0.0, 0.0, seed=1),
        DpTraining(1.0, 1.0, GradSampleMode.HOOKS, secure_mode=False),
        objective,
    )

    after = adapter_state(built.model)
    assert outcome.steps == 2 and np.isfinite(outcome.mean_loss)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize("arch", ARCHS)
def test_ghost_clipping_trains_every_family_as_hooks_does(arch):
    """Per-example answer losses clip like per-example gradients do (float32 base)."""
    from wardround.client.dp import GHOST_CLIP_MARGIN, DpTraining
    from wardround.client.trainer import LocalTrainSpec, train_local
    from wardround.client.vlm_objective import VlmObjective
    from wardround.common.adapter import adapter_state, load_adapter_state
    from wardround.common.config import GradSampleMode
    from wardround.sitedata.vlm_dataset import VlmDataset

    built = build_model(vlm_config(arch))
    fmt = PromptFormat.of(built.processor)
    items = []
    for k, answer in enumerate(["yes", "no", "no", "yes"] * 2):
        example = encode_example(
            built.processor, fmt, IMAGE, QUESTION, answer, max_tokens=128
        )
        items.append(
            {key: torch.as_tensor(v) for key, v in example.items()}
            | {"findings": torch.zeros(4), "index": torch.tensor(k)}
        )
    objective = VlmObjective.create(
        built.processor, TaskConfig(kind="vqa"), max_new_tokens=3, generations=0
    )
    initial = adapter_state(built.model)
    # a clip below the gradients' norms: every example is clipped; hooks at ghost's
    # effective clip, with the noise's std kept (see test_dp_training)
    inner = 0.01 * (1 - GHOST_CLIP_MARGIN)
    modes = {
        GradSampleMode.HOOKS: DpTraining(0.01 / inner, inner, GradSampleMode.HOOKS, False),
        GradSampleMode.GHOST: DpTraining(1.0, 0.01, GradSampleMode.GHOST, False),
    }  # fmt: skip
    trained = {}
    for mode, dp in modes.items():
        train_local(
            built.model,
            VlmDataset(items, ["q"] * 8, ["a"] * 8, np.arange(8) // 2),
            LocalTrainSpec(1, 0, 2, 0.01, 0.0, 0.0, seed=1),
            dp,
            objective,
        )
        trained[mode] = adapter_state(built.model)
        load_adapter_state(built.model, initial)
    hooks, ghost = trained[GradSampleMode.HOOKS], trained[GradSampleMode.GHOST]
    assert any(not np.array_equal(ghost[k], initial[k]) for k in initial)
    for name in hooks:
        # updates are 0.02 (AdamW, lr 0.01, 2 steps); unclipped they differ wholly
        np.testing.assert_allclose(ghost[name], hooks[name], rtol=1e-4, atol=1e-5)
