"""Tiny vision-language models built from configs, with locally built processors.

No model hub is needed: the tokenizer is a Unigram model over a fixed vocabulary
(every word the report rules and the prompts write, plus single characters as a
fallback, so any text encodes and decodes back exactly), built with the
``tokenizers`` library; image processors are their classes with small sizes; the
models are random (seeded) from small configs of the real architectures. Each
processor carries a chat template shaped like its family's real one.

:func:`save_tiny_vlm` writes model + processor with ``save_pretrained``, so
``AutoModelForImageTextToText.from_pretrained(folder)`` and
``AutoProcessor.from_pretrained(folder)`` load them like a downloaded model: the
real loading path, exercised without a hub.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from ..common.config import TINY_VLM_ARCHS
from ..common.errors import ConfigError
from ..common.report_text import vocabulary
from ..common.vlm_prompts import prompt_vocabulary
from .vlm_processor import image_only

IMAGE_SIZE = 32
"""Side of the tiny models' input images, in pixels."""
PATCH = 8
HIDDEN = 32

_SPECIAL = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
]

# Chat templates shaped like each family's own (LLaVA-1.5, Idefics3/SmolVLM,
# Qwen2-VL). PaliGemma has no conversation format: its processor puts the image
# tokens and <bos> before the prompt and a newline after it.
_CHAT_TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
        "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}"
        "{% endfor %}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "paligemma": (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}"
        "{% endif %}{% endfor %}"
    ),
    "idefics3": (
        "<|im_start|>{% for message in messages %}"
        "{{ message['role'] | capitalize }}:"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% elif c['type'] == 'text' %}{% if message['role'] == 'assistant' %} "
        "{% endif %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
    "qwen2-vl": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def tiny_tokenizer() -> Any:
    """A small fast tokenizer: every domain word one token, any other text by characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c "]
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _SPECIAL]
    pieces += [("▁", -2.0), ("\n", -5.0)]
    pieces += [(c, -10.0) for c in chars] + [("▁" + c, -9.0) for c in chars]
    # A whole word beats spelling it out, so domain text stays short.
    pieces += [("▁" + w, -1.0) for w in [*vocabulary(), *prompt_vocabulary()]]
    vocab = list(dict(pieces).items())  # first score of each piece, in order
    model = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    model.decoder = decoders.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # unannotated in transformers
        tokenizer_object=model,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=_SPECIAL[4:],
        padding_side="right",
    )


def _text_kwargs(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # The final norm fixes the hidden state's length, so the frozen random output
        # layer's scale bounds how peaked any answer distribution can get: at the
        # default 0.02 LoRA cannot take the report loss below ~5.3 nats (about
        # uniform); at 0.2 it falls to 2.3 in 3 local rounds (measured, llava).
        "initializer_range": 0.2,
    }


def _vision_kwargs() -> dict[str, Any]:
    return {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }


def _llava(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import (
        CLIPImageProcessorPil,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(), projection_dim=HIDDEN),
        text_config=LlamaConfig(**_text_kwargs(tokenizer, len(tokenizer))),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_layer=-1,
    )
    processor = LlavaProcessor(  # type: ignore[no-untyped-call]  # unannotated in transformers
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
        chat_template=_CHAT_TEMPLATES["llava"],
    )
    return config, processor


def _paligemma(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import (
        SiglipImageProcessorPil,
    )

    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # PaliGemmaProcessor reads this attribute, which the image processor class does
    # not declare
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH) ** 2  # type: ignore[attr-defined]
    # The processor adds PaliGemma's <loc>/<seg> tokens: size the vocabulary after.
    processor = PaliGemmaProcessor(  # type: ignore[no-untyped-call]  # unannotated in transformers
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_CHAT_TEMPLATES["paligemma"],
    )
    text = _text_kwargs(tokenizer, len(tokenizer))
    text.update(head_dim=HIDDEN // 4, num_key_value_heads=1)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs(), vision_use_head=False),
        text_config=GemmaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return config, processor


def _idefics3(tokenizer: Any) -> tuple[Any, Any]:
    # SmolVLM is this architecture too; its own processor class also needs
    # torchvision and num2words, so the tiny model is an Idefics3.
    from transformers import Idefics3Config as Config
    from transformers import Idefics3Processor as Processor
    from transformers import LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil as ImageProcessor,
    )

    scale = 2  # the connector's pixel shuffle: 2x2 patches -> one token
    config = Config(
        vision_config=_vision_kwargs(),
        text_config=LlamaConfig(**_text_kwargs(tokenizer, len(tokenizer))),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        # accepted and kept at run time; the config's typed signature omits it
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]
    )
    image_processor = ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // scale**2,
        chat_template=_CHAT_TEMPLATES["idefics3"],
    )
    return config, processor


def _qwen2_vl(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ids = tokenizer.convert_tokens_to_ids
    text = _text_kwargs(tokenizer, len(tokenizer))
    # Multimodal RoPE splits each head's rotary half into (time, height, width).
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [1, 1, 2],
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "embed_dim": HIDDEN,
            "hidden_size": HIDDEN,
            "num_heads": 4,
            "patch_size": PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    pixels = IMAGE_SIZE * IMAGE_SIZE
    # Qwen2-VL's processor has a video half that needs torchvision: images only.
    processor = image_only(Qwen2VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil(
            patch_size=PATCH,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels},
        ),
        tokenizer=tokenizer,
        chat_template=_CHAT_TEMPLATES["qwen2-vl"],
    )
    return config, processor


def tiny_vlm_parts(arch: str) -> tuple[Any, Any]:
    """The config and processor of a tiny ``arch`` model (no weights yet)."""
    if arch not in TINY_VLM_ARCHS:
        raise ConfigError(
            f"no tiny vision-language model {arch!r}",
            hint=f"Set model.tiny-arch to one of: {', '.join(TINY_VLM_ARCHS)}.",
        )
    tokenizer = tiny_tokenizer()
    if arch == "llava":
        return _llava(tokenizer)
    if arch == "paligemma":
        return _paligemma(tokenizer)
    if arch == "qwen2-vl":
        return _qwen2_vl(tokenizer)
    return _idefics3(tokenizer)


def build_tiny_vlm(arch: str, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random ``arch`` model (seeded, float32, eval mode) and its processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    config, processor = tiny_vlm_parts(arch)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(  # type: ignore[no-untyped-call]  # unannotated in transformers
            config, dtype=torch.float32
        )
    finally:
        torch.random.set_rng_state(state)
    return model.eval(), processor


def save_tiny_vlm(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny ``arch`` model and its processor with ``save_pretrained``."""
    model, processor = build_tiny_vlm(arch, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
