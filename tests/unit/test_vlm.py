"""The ``vlm`` family: tiny models of four architectures, prompts, LoRA targets,
the answer-only per-example loss, DP compatibility, and loading from a folder."""

import numpy as np
import pytest
import torch

from wardround.common.config import RunConfig, TaskConfig, TaskKind, VlmTower
from wardround.common.errors import ConfigError
from wardround.common.models import build_base_model, build_model
from wardround.common.models.vlm import lora_targets, tower_of
from wardround.common.models.vlm_tiny import build_tiny_vlm, save_tiny_vlm
from wardround.common.vlm_prompts import (
    IGNORE_INDEX,
    PromptFormat,
    encode_example,
    messages,
    serialize_ehr,
    stop_token_ids,
    user_text,
)

ARCHS = ("llava", "paligemma", "idefics3", "qwen2-vl")
QUESTION = "Is there a pleural effusion?"
IMAGE = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def _config(arch, dp=True, **model):
    towers = ["text"] if arch == "qwen2-vl" else ["vision", "projector", "text"]
    return RunConfig().with_overrides(
        model={"family": "vlm", "tiny_arch": arch, "lora_towers": towers, **model},
        task={"kind": "vqa"},
        privacy={"enabled": dp},
    )


@pytest.mark.parametrize(
    ("arch", "prompt", "suffix"),
    [
        ("llava", f"USER: <image>\n{QUESTION} ASSISTANT:", " yes</s>"),
        ("paligemma", f"<image>{QUESTION}", "yes</s>"),
        (
            "idefics3",
            f"<|im_start|>User:<image>{QUESTION}<end_of_utterance>\nAssistant:",
            " yes<end_of_utterance>\n",
        ),
        (
            "qwen2-vl",
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
            "yes<|im_end|>\n",
        ),
    ],
)
def test_each_family_prompts_through_its_chat_template(arch, prompt, suffix):
    _, processor = build_tiny_vlm(arch)
    fmt = PromptFormat.of(processor)

    assert fmt.prompt(processor, QUESTION) == prompt
    assert fmt.answer_suffix(processor, QUESTION, "yes") == suffix
    # generation stops at EOS and at the template's end-of-turn token
    tokenizer = processor.tokenizer
    end = {"idefics3": "<end_of_utterance>", "qwen2-vl": "<|im_end|>"}.get(arch)
    expected = [tokenizer.eos_token_id] + (
        [tokenizer.convert_tokens_to_ids(end)] if end else []
    )
    assert stop_token_ids(processor, fmt) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_on_the_answer_tokens_only(arch):
    _, processor = build_tiny_vlm(arch)
    fmt = PromptFormat.of(processor)
    answer = "Findings: No pleural effusion. Impression: no acute findings."

    example = encode_example(processor, fmt, IMAGE, QUESTION, answer, max_tokens=512)

    prompt = example["prompt_length"]
    labels, ids = example["labels"], example["input_ids"]
    assert (labels[:prompt] == IGNORE_INDEX).all()
    assert (labels[prompt:] == ids[prompt:]).all()
    decoded = processor.tokenizer.decode(ids[prompt:], skip_special_tokens=True)
    assert decoded.strip() == answer
    # the image placeholder became the model's image tokens, all in the prompt
    image_id = processor.tokenizer.convert_tokens_to_ids(fmt.image_token)
    assert (ids[:prompt] == image_id).sum() >= 4 and (ids[prompt:] != image_id).all()
    if arch == "paligemma":  # prefix LM: the answer is not prefix
        assert (example["token_type_ids"][prompt:] == 1).all()
        assert (example["token_type_ids"][:prompt] == 0).all()


def test_a_long_answer_is_cut_but_never_the_prompt():
    _, processor = build_tiny_vlm("llava")
    fmt = PromptFormat.of(processor)
    example = encode_example(
        processor, fmt, IMAGE, QUESTION, "yes " * 200, max_tokens=64
    )
    assert len(example["input_ids"]) == 64
    with pytest.raises(ValueError, match="max-seq-tokens"):
        encode_example(processor, fmt, IMAGE, QUESTION, "yes", max_tokens=20)


def test_ehr_serialisation_is_deterministic_and_readable():
    task = TaskConfig()
    n = len(task.numeric)
    features = np.zeros(task.ehr_width, np.float32)
    features[0] = (67.0 - 60.0) / 15.0  # age
    features[1] = (38.2 - 37.2) / 0.8  # temperature
    features[n + 2] = 1.0  # heart rate missing
    features[2 * n + 1] = 1.0  # sex: M

    text = serialize_ehr(features, task)

    assert text.startswith(
        "age 67 years; temperature 38.2 degC; heart rate not recorded"
    )
    assert text.endswith("; sex M")
    assert serialize_ehr(features.copy(), task) == text
    features[2 * n + 1] = 0.0  # no category at all
    assert serialize_ehr(features, task).endswith("; sex unknown")
    assert user_text(TaskKind.REPORT, ehr_text="x").startswith("Patient record: x.")
    assert messages("q", "a")[1]["role"] == "assistant"


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
    config = _config("qwen2-vl", lora_towers=["vision", "text"])

    with pytest.raises(ConfigError, match="packs all images") as refused:
        build_model(config)

    assert 'lora-towers = ["text"]' in refused.value.hint
    # the same towers train without DP, and the text tower alone with DP
    build_model(config.with_overrides(privacy={"enabled": False}))
    assert build_model(_config("qwen2-vl")).family == "vlm"


def test_qwen2_vl_text_tower_gets_exact_per_example_gradients_under_opacus():
    from opacus import GradSampleModule

    built = build_model(_config("qwen2-vl"))
    _, processor = build_tiny_vlm("qwen2-vl")
    fmt = PromptFormat.of(processor)
    from wardround.client.vlm_objective import VlmObjective

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
    batch = objective.collate(items)
    wrapped = GradSampleModule(built.model)

    objective.loss(wrapped, batch, torch.Generator()).backward()

    param = next(p for n, p in built.model.named_parameters() if p.requires_grad)
    per_example = param.grad_sample.clone()
    for k, item in enumerate(items):
        wrapped.zero_grad(set_to_none=True)
        for p in built.model.parameters():
            p.grad_sample = None
        objective.loss(
            wrapped,
            objective.collate([item | {"index": torch.tensor(0)}]),
            torch.Generator(),
        ).backward()
        torch.testing.assert_close(
            per_example[k] / 2, param.grad_sample[0] / 2, atol=1e-6, rtol=1e-4
        )
    wrapped._close()


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_an_examples_loss_does_not_depend_on_its_batch_padded_or_packed(arch):
    from wardround.client.data.vlm_dataset import VlmDataset
    from wardround.client.vlm_objective import VlmObjective

    built = build_model(_config(arch, dp=False, pack_sequences=True))
    processor = built.processor
    fmt = PromptFormat.of(processor)
    items = []
    for k, answer in enumerate(("yes", "no", "Findings: Lungs are clear.")):
        example = encode_example(
            processor, fmt, IMAGE, QUESTION, answer, max_tokens=256
        )
        item = {key: torch.as_tensor(v) for key, v in example.items()}
        items.append(item | {"findings": torch.zeros(4), "index": torch.tensor(k)})
    dataset = VlmDataset(items, ["q"] * 3, ["a"] * 3)
    padded = VlmObjective.create(
        processor, TaskConfig(kind="vqa"), max_new_tokens=4, generations=0
    )
    packed = VlmObjective.create(
        processor, TaskConfig(kind="vqa"), max_new_tokens=4, generations=0, pack=True
    )
    model = built.model.eval()

    with torch.no_grad():
        alone = [
            padded._forward_nll(model, padded.collate([dataset[k]]))[0][0]
            for k in range(3)
        ]
        sums_padded, _ = padded._forward_nll(model, padded.collate(list(dataset.items)))
        sums_packed, _ = packed._forward_nll(model, packed.collate(list(dataset.items)))

    torch.testing.assert_close(sums_padded, torch.stack(alone), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sums_packed, torch.stack(alone), atol=1e-4, rtol=1e-4)


def test_a_tiny_model_saved_to_a_folder_loads_like_a_downloaded_one(tmp_path):
    save_tiny_vlm("paligemma", tmp_path / "pg")
    from_folder = build_model(
        RunConfig().with_overrides(
            model={"family": "vlm", "path": str(tmp_path / "pg")}, task={"kind": "vqa"}
        )
    )
    in_memory = build_model(_config("paligemma"))

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
    from wardround.common.models.vlm_processor import load_processor

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

    from wardround.common.adapter import adapter_state, save_peft_adapter

    config = _config("llava")
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
    built = build_model(_config(arch, dp=False))
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
    from wardround.client.data.vlm_dataset import VlmDataset

    samples = objective.generate_samples(
        built.model.eval(), VlmDataset([item], ["q"], ["yes"]), torch.device("cpu")
    )
    assert len(samples) == 1 and isinstance(samples[0]["generated"], str)


def test_bf16_base_and_gradient_checkpointing_train_on_cpu():
    from wardround.client.vlm_objective import VlmObjective

    plain = _config("llava", dp=False)
    built = build_model(
        _config("llava", dp=False, dtype="bfloat16", gradient_checkpointing=True)
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


def test_vlm_config_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        RunConfig.from_mapping({"model": {"family": "vlm"}, "task": {"kind": "vqa"}})
    with pytest.raises(ConfigError, match="set task.kind to 'report' or 'vqa'"):
        RunConfig.from_mapping({"model": {"family": "vlm", "tiny-arch": "llava"}})
    with pytest.raises(ConfigError, match="needs model.family 'vlm'"):
        RunConfig.from_mapping({"task": {"kind": "report"}})
    with pytest.raises(ConfigError, match="tiny-arch 'gpt' is not one of"):
        RunConfig.from_mapping(
            {"model": {"family": "vlm", "tiny-arch": "gpt"}, "task": {"kind": "vqa"}}
        )
    base = {"family": "vlm", "tiny-arch": "llava"}
    for key, message in (
        ("gradient-checkpointing", "breaks Opacus"),
        ("pack-sequences", "no longer one record"),
    ):
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_mapping(
                {"model": {**base, key: True}, "task": {"kind": "vqa"}}
            )
    with pytest.raises(ConfigError, match="'hooks' or 'functorch'"):
        RunConfig.from_mapping(
            {
                "model": base,
                "task": {"kind": "vqa"},
                "privacy": {"grad-sample-mode": "ew"},
            }
        )
    with pytest.raises(ConfigError, match="not supported for paligemma"):
        build_model(
            RunConfig.from_mapping(
                {
                    "model": {
                        "family": "vlm",
                        "tiny-arch": "paligemma",
                        "pack-sequences": True,
                    },
                    "task": {"kind": "vqa"},
                    "privacy": {"enabled": False},
                }
            )
        )


def test_readme_vlm_config_parses(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(
        b
        for b in re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
        if 'family = "vlm"' in b
    )
    path = tmp_path / "run.toml"
    path.write_text(block)
    config = RunConfig.from_toml(path)
    assert (
        config.model.path == "/models/llava-med" and config.task.kind is TaskKind.REPORT
    )


def test_the_demo_config_is_a_valid_vlm_run():
    from pathlib import Path

    import wardround.simulations as simulations

    config = RunConfig.from_toml(Path(simulations.__file__).parent / "vlm_report.toml")
    assert config.model.family == "vlm" and config.model.tiny_arch == "llava"
    assert config.privacy.enabled and config.secure_aggregation.enabled


def test_dp_sgd_trains_lora_on_a_bfloat16_base():
    from wardround.client.data.vlm_dataset import VlmDataset
    from wardround.client.dp import DpTraining
    from wardround.client.trainer import LocalTrainSpec, train_local
    from wardround.client.vlm_objective import VlmObjective
    from wardround.common.adapter import adapter_state
    from wardround.common.config import GradSampleMode

    built = build_model(_config("llava", dtype="bfloat16"))
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
