"""The ``vlm`` family's objective: answer-token cross-entropy, per example.

**Loss.** Each example's loss is the mean cross-entropy over its own answer tokens
(prompt and image tokens carry label -100); the batch's loss is the mean over
examples. So an example's gradient depends on that example alone, which is what
DP-SGD's per-example clipping needs ("per-sequence" DP-SGD: a record is one study's
prompt and answer).

**Batches.** Examples are padded to the batch's longest (right padding). With
``model.pack-sequences`` (no DP) a batch's examples are instead laid end to end
in one row, with positions restarting at each example and no attention mask, so
transformers' attention keeps the examples apart and no compute goes to padding.

**Evaluation.** Validation loss is the mean NLL over all answer tokens, and
perplexity its exponential. Then the first ``train.eval-generations`` validation
examples are generated greedily and scored (:mod:`.vlm_metrics`). The texts stay
at the site.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..common import wire
from ..common.config import RunConfig, TaskConfig, TaskKind, VlmModelConfig
from ..common.vlm_prompts import (
    IGNORE_INDEX,
    SEQUENCE_KEYS,
    PromptFormat,
    decode_answers,
    stop_token_ids,
)
from ..models import BuiltModel
from ..sitedata.vlm_dataset import VlmDataset
from .objectives import EvalOutcome, tensors_to
from .vlm_metrics import exact_match, report_label_agreement, text_overlap

_PER_EXAMPLE = ("prompt_length", "findings", "index")
"""Item fields that are not model inputs."""


def answer_nll(
    logits: torch.Tensor, labels: torch.Tensor, example_ids: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer-token NLL and answer-token count per example.

    ``logits`` [R, T, V] predict the next token; ``labels`` and ``example_ids``
    [R, T] say which token each position holds and whose it is (-1: padding).
    Returns two float [n] tensors.
    """
    targets = labels[:, 1:]
    owner = example_ids[:, 1:]
    token_nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    counted = (targets.flatten() != IGNORE_INDEX) & (owner.flatten() >= 0)
    owner = owner.flatten()[counted]
    sums = token_nll.new_zeros(n).index_add(0, owner, token_nll[counted])
    counts = token_nll.new_zeros(n).index_add(
        0, owner, torch.ones_like(token_nll[counted])
    )
    return sums, counts


@dataclass(frozen=True)
class VlmObjective:
    """Collation, loss and evaluation for one processor and task."""

    processor: Any
    task: TaskConfig
    max_new_tokens: int
    generations: int
    pack: bool = False
    pad_id: int = 0

    @classmethod
    def create(
        cls,
        processor: Any,
        task: TaskConfig,
        *,
        max_new_tokens: int,
        generations: int,
        pack: bool = False,
    ) -> VlmObjective:
        """An objective for ``processor`` (its pad token pads the batches)."""
        pad = processor.tokenizer.pad_token_id
        if pad is None:
            pad = processor.tokenizer.eos_token_id or 0
        return cls(processor, task, max_new_tokens, generations, pack, int(pad))

    @classmethod
    def for_run(cls, config: RunConfig, built: BuiltModel) -> VlmObjective:
        """The run's objective, with the built model's processor (family registry)."""
        model = VlmModelConfig.of(config)
        return cls.create(
            built.processor,
            config.task,
            max_new_tokens=model.max_new_tokens,
            generations=config.train.eval_generations,
            pack=model.pack_sequences,
        )

    def prepare(self, model: torch.nn.Module, dataset: Dataset) -> Dataset:
        """The dataset as it is: every part of a VLM's forward pass may train."""
        return dataset

    # -- batches ----------------------------------------------------------------
    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Pad (or pack) the sequences; concatenate the image tensors."""
        if self.pack:
            return self._packed(items)
        longest = max(len(item["input_ids"]) for item in items)
        batch: dict[str, Any] = {}
        for key in (*SEQUENCE_KEYS, "labels"):
            if key not in items[0]:
                continue
            fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            rows = torch.full((len(items), longest), fill, dtype=torch.long)
            for r, item in enumerate(items):
                rows[r, : len(item[key])] = item[key]
            batch[key] = rows
        lengths = torch.tensor([len(item["input_ids"]) for item in items])
        positions = torch.arange(longest)[None, :]
        batch["example_ids"] = torch.where(
            positions < lengths[:, None], torch.arange(len(items))[:, None], -1
        )
        self._images_and_extras(items, batch)
        return batch

    def _packed(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "input_ids": torch.cat([item["input_ids"] for item in items])[None],
            "labels": torch.cat([item["labels"] for item in items])[None],
            "position_ids": torch.cat(
                [torch.arange(len(item["input_ids"])) for item in items]
            )[None],
            "example_ids": torch.cat(
                [
                    torch.full((len(item["input_ids"]),), k)
                    for k, item in enumerate(items)
                ]
            )[None],
        }
        self._images_and_extras(items, batch)
        return batch

    @staticmethod
    def _images_and_extras(
        items: list[dict[str, torch.Tensor]], batch: dict[str, Any]
    ) -> None:
        for key in items[0]:
            if key in batch or key in SEQUENCE_KEYS or key == "labels":
                continue
            if key in _PER_EXAMPLE:
                batch[key] = torch.stack([item[key] for item in items])
            else:  # image tensors: one leading entry (or patch rows) per item
                batch[key] = torch.cat([item[key] for item in items])

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """See :class:`~.objectives.Objective`."""
        return tensors_to(batch, device)

    def num_examples(self, batch: dict[str, Any]) -> int:
        """See :class:`~.objectives.Objective`."""
        return len(batch["index"])

    def _forward_nll(
        self, model: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {
            k: v
            for k, v in batch.items()
            if k not in _PER_EXAMPLE and k not in ("labels", "example_ids")
        }
        dtype = _float_dtype(model)
        for key in ("pixel_values",):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(dtype)
        labels = batch["labels"]
        # Only positions from the earliest answer on need logits: a vocabulary-wide
        # logit row per prompt and image token would dominate memory on a big model.
        answer_at = (labels != IGNORE_INDEX).float().argmax(dim=1)
        keep = labels.shape[1] - int(answer_at.min()) + 1
        if self.pack:
            keep = labels.shape[1]
        output = model(**inputs, use_cache=False, logits_to_keep=keep)
        logits = output.logits
        offset = labels.shape[1] - logits.shape[1]
        return answer_nll(
            logits,
            labels[:, offset:],
            batch["example_ids"][:, offset:],
            self.num_examples(batch),
        )

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Mean over examples of each example's mean answer-token NLL."""
        return self.example_losses(model, batch, generator).mean()

    def example_losses(
        self,
        model: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Each example's mean answer-token NLL, ``[batch]``."""
        sums, counts = self._forward_nll(model, batch)
        return sums / counts.clamp_min(1.0)

    # -- evaluation -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: VlmDataset, batch_size: int
    ) -> EvalOutcome:
        """Loss, perplexity and the generation scores on ``dataset``."""
        start = time.perf_counter()
        model.eval()
        device = next(model.parameters()).device
        n = len(dataset)
        nan = float("nan")
        if n == 0:
            return EvalOutcome(0, nan, nan, np.array([]), time.perf_counter() - start)
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate
        )
        nll = tokens = 0.0
        for batch in loader:
            sums, counts = self._forward_nll(model, tensors_to(batch, device))
            nll += float(sums.sum())
            tokens += float(counts.sum())
        loss = nll / max(tokens, 1.0)
        metrics = {wire.EVAL_PERPLEXITY: math.exp(min(loss, 50.0))}
        samples = self.generate_samples(model, dataset, device)
        metrics.update(self.score(samples, dataset))
        return EvalOutcome(
            num_examples=n,
            loss=loss,
            auroc_macro=nan,
            auroc_per_label=np.array([]),
            seconds=time.perf_counter() - start,
            metrics=metrics,
            samples=samples,
        )

    def generate_samples(
        self, model: torch.nn.Module, dataset: VlmDataset, device: torch.device
    ) -> list[dict[str, Any]]:
        """Greedy generations for the first ``generations`` examples, one at a time."""
        fmt = PromptFormat.of(self.processor)
        stops = stop_token_ids(self.processor, fmt)
        samples = []
        for i in range(min(self.generations, len(dataset))):
            item = dataset[i]
            prompt = int(item["prompt_length"])
            inputs = {}
            for key, value in item.items():
                if key in _PER_EXAMPLE or key == "labels":
                    continue
                inputs[key] = value[:prompt][None] if key in SEQUENCE_KEYS else value
            inputs = tensors_to(inputs, device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(_float_dtype(model))
            # a Hugging Face model's generate (Module.__getattr__ types it Tensor | Module)
            generate = cast(Callable[..., torch.Tensor], model.generate)
            output = generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=self.pad_id,
            )
            text = decode_answers(self.processor, [output[0, prompt:].tolist()])[0]
            samples.append(
                {
                    "example": i,
                    "prompt": dataset.prompts[i],
                    "reference": dataset.references[i],
                    "generated": text,
                }
            )
        return samples

    def score(
        self, samples: list[dict[str, Any]], dataset: VlmDataset
    ) -> dict[str, float]:
        """Exact match, text overlap and label agreement of the generated samples."""
        if not samples:
            return {wire.EVAL_GENERATED: 0}
        generated = [s["generated"] for s in samples]
        references = [s["reference"] for s in samples]
        scores = {
            wire.EVAL_GENERATED: len(samples),
            wire.TEXT_OVERLAP: text_overlap(generated, references),
        }
        if self.task.kind is TaskKind.VQA:
            scores[wire.EXACT_MATCH] = exact_match(generated, references)
        else:
            findings = np.stack(
                [dataset[s["example"]]["findings"].numpy() for s in samples]
            )
            scores[wire.LABEL_AGREEMENT] = report_label_agreement(
                generated, findings, self.task.labels
            )
        return scores


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the frozen base (image inputs are cast to it)."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            return param.dtype
    return torch.float32
