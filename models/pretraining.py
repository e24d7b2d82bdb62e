"""The pretraining loop: align a fusion model's encoders on an unlabelled corpus.

Each step takes one batch from one corpus site (site by site in turn), so the
contrastive loss cannot match a patient's views by what marks their hospital
(scanner intensity, note style) and has to match them by their content. Labels
are never read. Deterministic for a seed and a thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence, Sized
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import Dataset

from .alignment import AlignmentHeads, alignment_loss, augment_images, info_nce
from .base_folder import PRETRAINED_LAYERS

if TYPE_CHECKING:
    from .fusion import FusionModel

INPUTS = ("image", "ehr", "note_ids", "note_mask", "present")


@dataclass(frozen=True)
class PretrainSettings:
    """How the encoders are pretrained (part of the base's identity)."""

    steps: int = 400
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    threads: int = 2
    image_views: bool = True
    """Also contrast two augmented views of each image (SimCLR)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (manifests, cache keys)."""
        return asdict(self)


def trainable_for_pretraining(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The encoders and the layers a base carries; everything else is frozen."""
    keep = ("vision_encoder", "text_encoder", *PRETRAINED_LAYERS)
    params = []
    for name, param in model.named_parameters():
        wanted = name.split(".")[0] in keep
        param.requires_grad_(wanted)
        if wanted:
            params.append(param)
    return params


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup_steps) / span))


def _size(site: Dataset[Any]) -> int:
    return len(cast(Sized, site))  # corpus sites are map-style datasets with a length


def pretrain_encoders(
    model: torch.nn.Module,
    corpus: Sequence[Dataset[Any]],
    settings: PretrainSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Align ``model``'s encoders on the ``corpus`` sites; return the loss per step."""
    if not corpus or any(_size(site) < 2 for site in corpus):
        raise ValueError("every corpus site needs at least 2 examples")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        fusion = cast("FusionModel", model)  # pretraining is for fusion models
        heads = AlignmentHeads(fusion.head.in_features)
        params = trainable_for_pretraining(model) + list(heads.parameters())
        optimizer = torch.optim.AdamW(
            params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        generator = torch.Generator().manual_seed(settings.seed)
        orders = [torch.randperm(_size(site), generator=generator) for site in corpus]
        cursors = [0] * len(corpus)
        model.train()
        losses: list[float] = []
        for step in range(settings.steps):
            which = step % len(corpus)
            site, order = corpus[which], orders[which]
            size = min(settings.batch_size, _size(site))
            if cursors[which] + size > _size(site):
                orders[which] = order = torch.randperm(_size(site), generator=generator)
                cursors[which] = 0
            index = order[cursors[which] : cursors[which] + size]
            cursors[which] += size
            batch = _gather(site, index)
            _, pooled, present = fusion.encode(**{k: batch[k] for k in INPUTS})
            loss = alignment_loss(heads(pooled), present, settings.temperature)
            if settings.image_views and fusion.vision_encoder is not None:
                views = _image_view_loss(fusion, heads, batch, settings, generator)
                if views is not None:
                    loss = views if loss is None else loss + views
            if loss is None:
                continue
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * _lr_factor(step, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        torch.random.set_rng_state(rng_state)
        torch.set_num_threads(threads)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return losses


def _image_view_loss(
    model: FusionModel,
    heads: AlignmentHeads,
    batch: dict[str, torch.Tensor],
    settings: PretrainSettings,
    generator: torch.Generator,
) -> torch.Tensor | None:
    from .fusion import pool_image_tokens

    images = batch["image"][batch["present"][:, 0] > 0.5]
    if len(images) < 2:
        return None
    embeddings = []
    for _ in range(2):
        pooled = pool_image_tokens(
            model.vision_tokens(augment_images(images, generator))
        )
        pooled = torch.nn.functional.layer_norm(pooled, pooled.shape[-1:])
        embeddings.append(
            torch.nn.functional.normalize(heads.image_views(pooled), dim=-1)
        )
    return info_nce(embeddings[0], embeddings[1], settings.temperature)


def _gather(site: Dataset[Any], index: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = getattr(site, "tensors", None)
    if tensors is not None:  # TensorDictDataset: slice, do not collate item by item
        return {k: tensors[k][index] for k in INPUTS}
    items = [site[int(i)] for i in index]
    return {k: torch.stack([item[k] for item in items]) for k in INPUTS}
