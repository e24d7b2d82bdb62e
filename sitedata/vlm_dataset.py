"""A site's data for generative vision-language tasks (``report`` and ``vqa``).

The same stores as the classifier's (:func:`.dataset.prepare_site`: DICOM index,
decoded images, the EHR read through ``site.toml``'s schema, the study join and
the per-patient split), plus the text columns ``[ehr] report`` / ``question`` /
``answer`` name. Each study with a decoded image and a non-empty target becomes
one example, tokenised once with the model's processor
(:func:`wardround.common.vlm_prompts.encode_example`): for ``report`` the image
and the serialised EHR prompt the report; for ``vqa`` the image and the question
prompt the answer. Items are dicts of tensors::

    input_ids       int64 [L]   prompt (image tokens included) + answer
    labels          int64 [L]   -100 except on the answer
    attention_mask  int64 [L]   (and token_type_ids / mm_token_type_ids if the
                                processor makes them)
    pixel_values    float32     as the processor shapes them (leading dim 1 per
                                image; Qwen2-VL: patches), with image_grid_thw /
                                pixel_attention_mask where it makes them
    prompt_length   int64 []
    findings        float32 [len(task.labels)]
    index           int64 []    the example's position (for its reference text)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from ..common.config import RunConfig, TaskConfig, TaskKind, VlmModelConfig
from ..common.errors import DataError
from ..common.vlm_prompts import (
    PromptFormat,
    encode_example,
    serialize_ehr,
    user_text,
)
from .dataset import PreparedSite, SiteData, prepare_site, split_patients
from .ehr import BATCH_ROWS, record_keys
from .ehr_source import ehr_source
from .patients import count_patients, patient_ordinals, patients_of
from .site_config import SiteConfig


class WithProcessor(Protocol):
    """A built vlm model (``wardround.models.BuiltModel``): its processor tokenises."""

    processor: Any


logger = logging.getLogger(__name__)


class VlmDataset(Dataset):
    """Tokenised examples (variable length) and their texts, in memory.

    ``patients`` numbers each example's patient (see :mod:`.patients`); DP-SGD
    samples by it and refuses a dataset without it.
    """

    def __init__(
        self,
        items: list[dict[str, torch.Tensor]],
        prompts: list[str],
        references: list[str],
        patients: np.ndarray | None = None,
    ) -> None:
        if not len(items) == len(prompts) == len(references):
            raise ValueError("items, prompts and references differ in length")
        if patients is not None and len(patients) != len(items):
            raise ValueError(f"{len(patients)} patient numbers for {len(items)} items")
        self.patients = patients
        self.items = items
        self.prompts = prompts
        """The user's text of each example (the EHR or question; no image)."""
        self.references = references
        """The target text of each example (report or answer)."""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]

    @property
    def nbytes(self) -> int:
        """Bytes the examples' tensors and their texts (UTF-8) hold."""
        tensors = sum(t.nbytes for item in self.items for t in item.values())
        texts = sum(len(t.encode()) for t in (*self.prompts, *self.references))
        return tensors + texts

    def subset(self, indices: np.ndarray) -> VlmDataset:
        """The examples at ``indices``, renumbered."""
        picked = [dict(self.items[i]) for i in indices]
        for k, item in enumerate(picked):
            item["index"] = torch.tensor(k)
        return VlmDataset(
            picked,
            [self.prompts[i] for i in indices],
            [self.references[i] for i in indices],
            None if self.patients is None else self.patients[indices],
        )


@dataclass(frozen=True)
class TextColumns:
    """Per study UID: the target (report or answer) and, for vqa, the question."""

    target: dict[str, str]
    question: dict[str, str]


def read_text_columns(site: SiteConfig, kind: TaskKind) -> TextColumns:
    """Read the task's text columns, first row per study (as the join does)."""
    schema = site.ehr
    wanted = (
        {"report": schema.report}
        if kind is TaskKind.REPORT
        else {"question": schema.question, "answer": schema.answer}
    )
    source = ehr_source(site)
    arrow_schema = source.arrow_schema()
    have = set(arrow_schema.names)
    missing = [(key, col) for key, col in wanted.items() if col not in have]
    if missing:
        raise DataError(
            f"{source.label} lacks the {kind.value} column(s) "
            + ", ".join(f"{col!r} ({key})" for key, col in missing),
            hint="Name your columns in site.toml: "
            + ", ".join(f'`[ehr] {key} = "<column>"`' for key, _ in missing)
            + ".",
        )
    columns_read = list(dict.fromkeys([schema.study_uid, *wanted.values()]))
    table = pa.Table.from_batches(
        list(source.batches(columns_read, BATCH_ROWS)),
        schema=pa.schema([arrow_schema.field(c) for c in columns_read]),
    )
    studies = record_keys(table.column(schema.study_uid))  # as the EHR's join reads
    columns = {
        key: pc.cast(table.column(col), "string").to_pylist()
        for key, col in wanted.items()
    }
    target_key = "report" if kind is TaskKind.REPORT else "answer"
    target: dict[str, str] = {}
    question: dict[str, str] = {}
    for row, study in enumerate(studies):
        if study is None or study in target:
            continue
        target[study] = (columns[target_key][row] or "").strip()
        if kind is TaskKind.VQA:
            question[study] = (columns["question"][row] or "").strip()
    return TextColumns(target=target, question=question)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """[C, S, S] in [0, 1] -> uint8 [S, S, 3] (grey repeated; 3 channels as RGB)."""
    if image.shape[0] == 3:
        rgb = np.moveaxis(image, 0, -1)
    else:
        rgb = np.repeat(image[image.shape[0] // 2][..., None], 3, axis=-1)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def load_vlm_site_data_for_run(
    site: SiteConfig, task: TaskConfig, config: RunConfig, built: WithProcessor
) -> SiteData:
    """The vlm family's data loader: the built model's processor tokenises."""
    model = VlmModelConfig.of(config)
    return load_vlm_site_data(
        site,
        task,
        built.processor,
        image_size=model.image_size,
        max_tokens=model.max_seq_tokens,
    )


@dataclass
class _Examples:
    """A site's encoded examples, and how many studies could not become one."""

    items: list[dict[str, torch.Tensor]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    without_image: int = 0
    image_errors: int = 0
    skipped_text: int = 0


def load_vlm_site_data(
    site: SiteConfig,
    task: TaskConfig,
    processor: Any,
    *,
    image_size: int,
    max_tokens: int,
) -> SiteData:
    """Index, read, join, split and tokenise a site's report or VQA examples."""
    prep = prepare_site(site, task, image_size=image_size)
    texts = read_text_columns(site, task.kind)
    examples = _encode_examples(prep, texts, task, processor, max_tokens)
    if not examples.items:
        raise DataError(
            f"no study has both a decodable image and a {task.kind.value} text "
            f"({examples.without_image + examples.image_errors} without image, "
            f"{examples.skipped_text} without text)",
            hint="Check `[ehr]` report / question / answer in site.toml and the "
            "DICOM folders (`wardround site check`).",
        )
    everything = VlmDataset(
        examples.items,
        examples.prompts,
        examples.references,
        patient_ordinals(examples.patients),
    )
    in_val = split_patients(
        examples.patients, site.data.split_seed, site.data.validation_fraction
    )
    logger.info(
        "vlm %s data: %d examples (%d validation); %d studies without image, "
        "%d images not decoded, %d without text",
        task.kind.value,
        len(examples.items),
        int(in_val.sum()),
        examples.without_image,
        examples.image_errors,
        examples.skipped_text,
    )
    train = everything.subset(np.flatnonzero(~in_val))
    return SiteData(
        train=train,
        validation=everything.subset(np.flatnonzero(in_val)),
        fingerprint=prep.fingerprint,
        num_studies=len(examples.items),
        num_unmatched_ehr=prep.join.ehr_studies - prep.join.ehr_with_image,
        num_unmatched_images=prep.join.dicom_studies - prep.join.dicom_with_ehr,
        num_privacy_units=count_patients(patients_of(train)),
        num_image_errors=examples.image_errors,
        num_without_image=examples.without_image,
    )


def _encode_examples(
    prep: PreparedSite,
    texts: TextColumns,
    task: TaskConfig,
    processor: Any,
    max_tokens: int,
) -> _Examples:
    """One example per joined study with a decoded image and its target text."""
    fmt = PromptFormat.of(processor)
    position = {study: j for j, study in enumerate(prep.images)}
    ehr = prep.ehr
    examples = _Examples()
    for i in prep.join.rows:
        study = ehr.study_uids[i]
        j = position.get(study) if study is not None else None
        # an EHR row kept without image (task.require-image false)
        if study is None or j is None:
            examples.without_image += 1
            continue
        if np.isnan(prep.decoded[j]).any():  # a prompt needs its image
            examples.image_errors += 1
            continue
        target = texts.target.get(study, "")
        question = texts.question.get(study, "")
        if not target or (task.kind is TaskKind.VQA and not question):
            examples.skipped_text += 1
            continue
        text = user_text(
            task.kind, ehr_text=serialize_ehr(ehr.features[i], task), question=question
        )
        try:
            encoded = encode_example(
                processor,
                fmt,
                to_rgb_uint8(prep.decoded[j]),
                text,
                target,
                max_tokens=max_tokens,
            )
        except ValueError as exc:
            raise DataError(
                f"a {task.kind.value} prompt does not fit: {exc}",
                hint="Raise model.max-seq-tokens.",
            ) from None
        item = {
            k: torch.as_tensor(v)
            for k, v in encoded.items()
            if isinstance(v, np.ndarray)
        }
        item["prompt_length"] = torch.tensor(encoded["prompt_length"])
        # NaN where the site's label cell was unknown: label agreement skips it
        item["findings"] = torch.from_numpy(
            np.where(ehr.label_null[i], np.nan, ehr.labels[i]).astype(np.float32)
        )
        item["index"] = torch.tensor(len(examples.items))
        examples.items.append(item)
        examples.prompts.append(text)
        examples.references.append(target)
        examples.patients.append(ehr.patient_ids[i] or "")
    return examples
