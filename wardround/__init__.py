"""wardround: federated LoRA fine-tuning of multimodal medical models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wardround")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
