"""Prompts for generative vision-language models: EHR as text, chat templates, labels.

**EHR serialisation** (:func:`serialize_ehr`) is deterministic: the run's features
in the run's order (``task.numeric`` then ``task.categorical``), each as
``<name> <value> <unit>`` joined by ``"; "``. Names have underscores as spaces;
numeric values are in the run's unit (sites' units already converted), rounded to
one decimal with trailing zeros dropped (``38.2``, ``67``); a missing or
out-of-range value reads ``not recorded``; a category outside the run's
vocabulary reads ``unknown``. Example::

    age 67 years; temperature 38.2 degC; heart rate not recorded; sex M

**Prompts** (:func:`messages`) are chat messages rendered by the processor's own
chat template (``processor.apply_chat_template``): the image, then for ``report``
the serialised EHR and :data:`REPORT_INSTRUCTION`, for ``vqa`` the question.

**Answer-only loss** (:func:`encode_example`): the prompt goes through the
processor (which expands the image placeholder into the model's image tokens);
the answer with the template's end-of-turn marker is tokenised apart and appended,
and only its tokens get labels (all others -100).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TaskConfig, TaskKind

REPORT_INSTRUCTION = "Write the radiology report for this study."
EHR_HEADER = "Patient record:"
NOT_RECORDED = "not recorded"
UNKNOWN = "unknown"
IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt, image, padding)."""


def prompt_vocabulary() -> list[str]:
    """Words the prompts write (for the tiny tokenizer's fixed vocabulary)."""
    defaults = TaskConfig()
    texts = [REPORT_INSTRUCTION, EHR_HEADER, NOT_RECORDED, UNKNOWN, "USER", "ASSISTANT"]
    texts += ["User", "Assistant", "user", "assistant", "years", "bpm", "degC"]
    texts += [name.replace("_", " ") for name in defaults.numeric]
    texts += list(defaults.categorical)
    words: list[str] = []
    for text in texts:
        for word in re.findall(r"[A-Za-z]+", text):
            if word not in words:
                words.append(word)
    return words


def format_value(value: float) -> str:
    """One decimal, trailing zeros dropped: 38.2, 67, -0.5 (deterministic)."""
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def serialize_ehr(features: np.ndarray, task: TaskConfig) -> str:
    """The EHR vector of one study (``TaskConfig.ehr_width`` layout) as text.

    The vector holds normalised values, missingness flags and one-hots (see
    ``sitedata/ehr.py``); this undoes the normalisation with the run's
    statistics, so every site writes the same text for the same values.
    """
    n = len(task.numeric)
    parts = []
    for j, (name, norm) in enumerate(task.numeric.items()):
        label = name.replace("_", " ")
        if features[n + j] > 0.5:
            parts.append(f"{label} {NOT_RECORDED}")
            continue
        value = float(features[j]) * norm.std + norm.mean
        unit = task.units.get(name, "")
        parts.append(f"{label} {format_value(value)}{' ' + unit if unit else ''}")
    start = 2 * n
    for name, vocab in task.categorical.items():
        block = features[start : start + len(vocab) + 1]
        start += len(vocab) + 1
        hot = int(np.argmax(block)) if block.max() > 0.5 else len(vocab)
        parts.append(
            f"{name.replace('_', ' ')} {vocab[hot] if hot < len(vocab) else UNKNOWN}"
        )
    return "; ".join(parts)


def user_text(kind: TaskKind, *, ehr_text: str = "", question: str = "") -> str:
    """The text part of the user's turn for a task."""
    if kind is TaskKind.REPORT:
        return f"{EHR_HEADER} {ehr_text}. {REPORT_INSTRUCTION}"
    if kind is TaskKind.VQA:
        return question
    raise ValueError(f"task kind {kind.value!r} has no prompt")


def messages(text: str, answer: str | None = None) -> list[dict[str, Any]]:
    """Chat messages: the user's image and text, then the answer if given."""
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    ]
    if answer is not None:
        turns.append(
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        )
    return turns


@dataclass(frozen=True)
class PromptFormat:
    """How one processor turns a conversation into a prompt and an answer suffix."""

    prefix_lm: bool
    """PaliGemma: the prompt is a bidirectional prefix and ``token_type_ids`` mark
    it (0) apart from the answer (1); the answer ends with the EOS token."""
    image_token: str

    @classmethod
    def of(cls, processor: Any) -> PromptFormat:
        """The format of a Hugging Face processor."""
        name = type(processor).__name__
        token = getattr(processor, "image_token", None) or "<image>"
        return cls(prefix_lm=name.startswith("PaliGemma"), image_token=token)

    def prompt(self, processor: Any, text: str) -> str:
        """The prompt string, ending where the model's answer starts."""
        template = getattr(processor, "chat_template", None)
        if template is None:
            # A checkpoint without a chat template (PaliGemma's pretrained ones): the
            # image placeholder, then the text.
            return f"{self.image_token}{text}"
        turns = messages(text)
        return str(
            processor.apply_chat_template(
                turns, add_generation_prompt=not self.prefix_lm, tokenize=False
            )
        )

    def answer_suffix(self, processor: Any, text: str, answer: str) -> str:
        """What follows the prompt for ``answer``: the answer and its end marker."""
        eos = processor.tokenizer.eos_token or ""
        template = getattr(processor, "chat_template", None)
        if self.prefix_lm or template is None:
            return answer + eos
        prompt = self.prompt(processor, text)
        full = str(
            processor.apply_chat_template(
                messages(text, answer), add_generation_prompt=False, tokenize=False
            )
        )
        if not full.startswith(prompt) or answer not in full[len(prompt) :]:
            return answer + eos
        return full[len(prompt) :]


def stop_token_ids(processor: Any, fmt: PromptFormat) -> list[int]:
    """Token ids that end a generated answer: EOS and the template's end-of-turn."""
    tokenizer = processor.tokenizer
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    suffix = fmt.answer_suffix(processor, "x", "x")
    special = set(tokenizer.all_special_ids)
    for token in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if token in special and token not in ids:
            ids.append(token)
    return ids


# Outputs of a processor that run along the token sequence (padded with it).
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def encode_example(
    processor: Any,
    fmt: PromptFormat,
    image: np.ndarray,
    text: str,
    answer: str,
    *,
    max_tokens: int,
) -> dict[str, Any]:
    """Tokenise one example for training: prompt + answer, labels on the answer only.

    Parameters
    ----------
    image
        uint8 [H, W, 3].
    max_tokens
        Longest prompt + answer; a longer answer is cut (the prompt, with its image
        tokens, never is; a prompt longer than this raises ValueError).

    Returns
    -------
    dict
        ``input_ids``, ``labels`` (int64 [L]), ``prompt_length``, the processor's
        other sequence outputs extended over the answer (``token_type_ids``: 1 on
        it), and its image outputs (``pixel_values``, ...) as numpy arrays.
    """
    prompt = fmt.prompt(processor, text)
    encoded = processor(images=[image], text=[prompt], return_tensors="np")
    prompt_ids = np.asarray(encoded["input_ids"][0], np.int64)
    suffix = fmt.answer_suffix(processor, text, answer)
    answer_ids = np.asarray(
        processor.tokenizer(suffix, add_special_tokens=False)["input_ids"], np.int64
    )
    room = max_tokens - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"the prompt alone is {len(prompt_ids)} tokens, over model.max-seq-tokens "
            f"({max_tokens})"
        )
    answer_ids = answer_ids[:room]
    out: dict[str, Any] = {
        "input_ids": np.concatenate([prompt_ids, answer_ids]),
        "labels": np.concatenate(
            [np.full(len(prompt_ids), IGNORE_INDEX, np.int64), answer_ids]
        ),
        "prompt_length": len(prompt_ids),
    }
    for key, value in encoded.items():
        if key == "input_ids":
            continue
        value = np.asarray(value)
        if key in SEQUENCE_KEYS:
            # the answer is attended to and, for a prefix LM, is not prefix
            fill = key == "attention_mask" or (
                key == "token_type_ids" and fmt.prefix_lm
            )
            out[key] = np.concatenate(
                [value[0], np.full(len(answer_ids), int(fill), value.dtype)]
            )
        elif key not in ("labels",):
            out[key] = value
    return out


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: how exact match compares answers."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def decode_answers(processor: Any, sequences: Sequence[Sequence[int]]) -> list[str]:
    """Generated token ids (answer part only) as text, special tokens dropped."""
    return [
        processor.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
        for ids in sequences
    ]
