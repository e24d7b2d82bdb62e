"""Loading a vision-language model's processor, also where its video half cannot load.

Some processors (Qwen2-VL's among them) hold a video processor, and transformers'
video processors need torchvision. wardround only feeds images, so where the
video half cannot be built the processor is assembled from the checkpoint's own
image processor, tokenizer, chat template and settings, without it.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common.errors import ConfigError

if TYPE_CHECKING:
    from transformers import ProcessorMixin

log = logging.getLogger(__name__)

_VIDEO = "video_processor"


@functools.cache
def image_only(cls: type[ProcessorMixin]) -> type:
    """``cls`` (a processor class) without its video processor attribute.

    The subclass keeps the class's name, so ``save_pretrained`` records the real
    processor class and a machine with torchvision loads the full one.
    """
    # get_attributes is unannotated in transformers
    attributes = [a for a in cls.get_attributes() if a != _VIDEO]  # type: ignore[no-untyped-call]
    if len(attributes) == len(cls.get_attributes()):  # type: ignore[no-untyped-call]
        return cls
    return type(
        cls.__name__,
        (cls,),
        {
            "get_attributes": classmethod(lambda _cls: list(attributes)),
            "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} for images only (no video processor).",
        },
    )


def load_processor(path: str) -> Any:
    """``AutoProcessor.from_pretrained(path)``, or the image-only assembly above."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]  # unannotated in transformers
    except (ImportError, OSError, ValueError, AttributeError, TypeError) as exc:
        first = exc
    try:
        return _assemble_image_only(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"cannot load the processor of {path!r}: {first}",
            hint="Give a folder written by the processor's save_pretrained (or a hub "
            f"id in the local cache); assembling it without video failed too: {exc}",
        ) from None


def _assemble_image_only(path: str) -> Any:
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    settings = _read_json(path, "processor_config.json")
    name = settings.pop("processor_class", None)
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None:
        raise ValueError("processor_config.json names no processor class")
    settings.pop(_VIDEO, None)
    settings = {k: v for k, v in settings.items() if not isinstance(v, dict)}
    template = _read_text(path, "chat_template.jinja")
    if template is not None:
        settings.setdefault("chat_template", template)
    processor = image_only(cls)(
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        **({_VIDEO: None} if _VIDEO in cls.get_attributes() else {}),
        **settings,
    )
    log.info("processor of %s assembled without its video processor", path)
    return processor


def _local_file(path: str, name: str) -> Path | None:
    local = Path(path) / name
    if local.is_file():
        return local
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, name, local_files_only=True))
    except Exception:  # not in the local cache: the caller decides
        return None


def _read_json(path: str, name: str) -> dict[str, Any]:
    found = _local_file(path, name)
    return json.loads(found.read_text()) if found else {}


def _read_text(path: str, name: str) -> str | None:
    found = _local_file(path, name)
    return found.read_text() if found else None
