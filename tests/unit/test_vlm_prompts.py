"""The ``vlm`` family's examples: chat-template prompts, the answer-only
per-example loss (padded or packed), the EHR as text, and the family's config."""

import numpy as np
import pytest
import torch
from vlm_cases import ARCHS, IMAGE, QUESTION, vlm_config

from wardround.common.config import RunConfig, TaskConfig, TaskKind
from wardround.common.errors import ConfigError
from wardround.common.vlm_prompts import (
    IGNORE_INDEX,
    PromptFormat,
    encode_example,
    messages,
    serialize_ehr,
    stop_token_ids,
    user_text,
)
from wardround.models import build_model
from wardround.models.vlm_tiny import build_tiny_vlm
from wardround.ops.config_file import load_run_config


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


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_an_examples_loss_does_not_depend_on_its_batch_padded_or_packed(arch):
    from wardround.client.vlm_objective import VlmObjective
    from wardround.sitedata.vlm_dataset import VlmDataset

    built = build_model(vlm_config(arch, dp=False, pack_sequences=True))
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
    with pytest.raises(ConfigError, match="'hooks', 'functorch' or 'ghost'"):
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
    config = load_run_config(path)
    assert (
        config.model.path == "/models/llava-med" and config.task.kind is TaskKind.REPORT
    )


def test_the_demo_config_is_a_valid_vlm_run():
    from pathlib import Path

    import wardround.simulations as simulations

    config = load_run_config(Path(simulations.__file__).parent / "vlm_report.toml")
    assert config.model.family == "vlm" and config.model.tiny_arch == "llava"
    assert config.privacy.enabled and config.secure_aggregation.enabled
