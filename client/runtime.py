"""A site's loaded state: its config, data and model, kept warm between messages.

Cached per (site.toml, run config) so a simulated worker that serves several
sites never mixes their data: each site has its own entry. The sites of one run
config share its model, since every train/evaluate message loads the whole adapter
into it before use (``_SHARED``). A simulated worker serves every site in
turn, so the cache is bounded by memory, not by a count of sites: a count below the
number of sites evicted, round after round, each site just before the worker served
it again (a data load, and a model build, per message).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common.adapter import adapter_state, payload_keys
from ..common.config import LoraVariant, RunConfig
from ..common.errors import ConfigError
from ..common.packing import AdapterLayout
from ..common.recipe import training_recipe
from ..models import BuiltModel, family_of
from ..sitedata.site_config import SiteConfig
from .answers import ANSWER_LOG, AnswerLog
from .egress import EgressAllowlist
from .frozen_features import cached_nbytes
from .ledger import PrivacyLedger, site_ledger

if TYPE_CHECKING:
    from .objectives import Objective

log = logging.getLogger(__name__)

SITE_CONFIG_KEY = "site-config"
"""SuperNode ``--node-config`` key naming the site's ``site.toml`` (deployment)."""
CACHE_SHARE_OF_MEMORY = 1 / 8
"""The share of the machine's memory (of the GPU's, for models on a GPU) that the
sites kept by one process may hold of their own: their data, and models they do not
share (a shared model is a fixed cost). The most recently used site is always kept."""


@dataclass
class SiteRuntime:
    """What a site needs to answer train and evaluate messages."""

    site: SiteConfig
    data: Any  # sitedata.dataset.SiteData
    built: BuiltModel
    site_index: int
    config: RunConfig

    @functools.cached_property
    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every adapter tensor's shape, in sorted key order."""
        return {k: tuple(v.shape) for k, v in adapter_state(self.built.model).items()}

    @functools.cached_property
    def adapter_layout(self) -> AdapterLayout:
        """The global adapter's packed layout (what the coordinator sends)."""
        return AdapterLayout.of_shapes(self.adapter_shapes)

    @property
    def adapter_keys(self) -> list[str]:
        """Every adapter tensor, sorted (their order in the packed array)."""
        return list(self.adapter_shapes)

    @functools.cached_property
    def payload_keys(self) -> list[str]:
        """The adapter tensors this site sends back (FFA-LoRA: not the frozen A)."""
        return payload_keys(
            self.adapter_keys,
            frozen_lora_a=self.config.model.lora_variant is LoraVariant.FFA,
            personal=self.config.federation.personal,
        )

    @functools.cached_property
    def allowlist(self) -> EgressAllowlist:
        """What may leave this site: the payload tensors and the wire's metrics."""
        return EgressAllowlist.for_payload(
            {k: self.adapter_shapes[k] for k in self.payload_keys},
            self.config.task.labels,
            transport=self.config.federation.transport_dtype,
        )

    @functools.cached_property
    def objective(self) -> Objective:
        """What local training optimises and evaluation measures, for the family."""
        return family_of(self.config).make_objective(self.config, self.built)

    @functools.cached_property
    def ledger(self) -> PrivacyLedger:
        """This site's privacy ledger (one per site, whatever the model)."""
        return site_ledger(self.site.ledger_path)

    @functools.cached_property
    def answers(self) -> AnswerLog:
        """How often this site has answered each run (beside the ledger)."""
        return AnswerLog(self.site.ledger_path / ANSWER_LOG)


_CACHE: OrderedDict[tuple[str, str], SiteRuntime] = OrderedDict()
_SHARED: dict[str, BuiltModel] = {}
"""The model of each run config, shared by the cached sites of that config.

A model is built from the run config alone, and every message loads the whole
adapter (the global one, then the site's personal modules) before it trains or
evaluates, so nothing of one site's use stays in it for the next site, unless the
model keeps state that training changes outside the adapter (running statistics):
such a model is built for each site (:func:`shareable`). A message that fails
part-way drops the model (:func:`forget_model`).
"""


def samples_folder(cache_path: Path, run_id: str) -> Path:
    """Where a site keeps the texts its model generated in a run (never sent)."""
    # Letters, digits, - and _ only: a run id is the coordinator's text, and
    # "." or ".." would name a folder outside generations/.
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)[:120]
    return Path(cache_path) / "generations" / (safe or "_")


def resolve_site_toml(
    node_config: dict[str, Any], config: RunConfig
) -> tuple[Path, int]:
    """Find this node's ``site.toml`` and a numeric site index.

    Deployment: the SuperNode's node config names it (``site-config``).
    Simulation: ``partition-id`` picks the N-th site under ``data.sites-dir``.
    """
    if SITE_CONFIG_KEY in node_config:
        return Path(str(node_config[SITE_CONFIG_KEY])), -1
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        sites = sorted(Path(config.data.sites_dir).glob("*/site.toml"))
        if pid >= len(sites):
            raise ConfigError(
                f"simulated site {pid} has no site.toml: {len(sites)} site(s) under "
                f"data.sites-dir={config.data.sites_dir!r}",
                hint="Run as many simulated sites as there are site folders.",
            )
        return sites[pid], pid
    raise ConfigError(
        "this node does not know its site.toml",
        hint=f"Start the site with --node-config \"{SITE_CONFIG_KEY}='/path/site.toml'\".",
    )


def resolve_device(spec: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; a named GPU must exist."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device={spec!r} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) visible to torch",
                hint="Use train.device = 'auto' or 'cpu', or install the CUDA build of torch.",
            )
    return spec


def _config_key(config: RunConfig) -> str:
    # Everything a SiteRuntime reads from its config: a long-lived worker given a
    # changed setting must not answer with a runtime built for the old one.
    relevant = {
        "model": config.model.model_dump(mode="json"),
        # 'auto' keys resolve by privacy.enabled: the built model differs with them
        "recipe": training_recipe(config).trainable.value,
        "task": config.task.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json"),
        "personal": list(config.federation.personal),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def get_runtime(site_toml: Path, site_index: int, config: RunConfig) -> SiteRuntime:
    """Load (or reuse) the site's data and model for this run config."""
    key = (str(Path(site_toml).resolve()), _config_key(config))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    from ..sitedata.imaging import task_for_site

    site = SiteConfig.from_toml(site_toml)
    # a site without imaging refuses a run that requires images, saying why
    task = task_for_site(site, config.task, config.requires_images)
    built = _SHARED.get(key[1]) or _build(config)
    # a vlm's processor tokenises the site's examples
    data = family_of(config).load_data(site, task, config, built)
    if shareable(built.model):
        _SHARED[key[1]] = built  # once a site has loaded: see _SHARED
    runtime = SiteRuntime(
        site=site, data=data, built=built, site_index=site_index, config=config
    )
    log.info("site %d loaded: %d studies", site_index, data.num_studies)
    _CACHE[key] = runtime
    while len(_CACHE) > 1 and _over_budget(list(_CACHE.values())):
        _CACHE.popitem(last=False)
    in_use = {config_key for _, config_key in _CACHE}
    for config_key in [k for k in _SHARED if k not in in_use]:
        del _SHARED[config_key]
    return runtime


def forget_model(runtime: SiteRuntime) -> None:
    """Drop ``runtime``'s model and every cached site that uses it.

    For a message that failed part-way through training: the model may still carry
    Opacus's hooks or other half-made state, so the next message builds it anew.
    """
    for key in [k for k, r in _CACHE.items() if r.built is runtime.built]:
        del _CACHE[key]
    for config_key in [k for k, b in _SHARED.items() if b is runtime.built]:
        del _SHARED[config_key]


def _build(config: RunConfig) -> BuiltModel:
    built = family_of(config).build(config)
    if not config.model.generative:
        # a classifier's adapter is small; a site's own model starts from it
        built.initial_adapter = adapter_state(built.model)
    built.model.to(resolve_device(config.train.device))
    return built


def shareable(model: Any) -> bool:
    """Whether training changes nothing in ``model`` but its trainable tensors."""
    return not any(
        getattr(module, "track_running_stats", False) for module in model.modules()
    )


def _over_budget(runtimes: list[SiteRuntime]) -> bool:
    # A shared model is a fixed cost: evicting sites cannot free it while the newest
    # site uses it. What the budget bounds is what each site holds of its own.
    shared = {id(b.model) for b in _SHARED.values()}
    held: dict[str, int] = {}
    own_models = {id(r.built.model): r.built.model for r in runtimes}
    for model_id, model in own_models.items():
        if model_id not in shared:
            for device, size in model_bytes(model).items():
                held[device] = held.get(device, 0) + size
    held["cpu"] = held.get("cpu", 0) + sum(
        r.data.nbytes + cached_nbytes(r.data.train) + cached_nbytes(r.data.validation)
        for r in runtimes
    )
    return any(size > memory_budget(device) for device, size in held.items())


def model_bytes(model: Any) -> dict[str, int]:
    """Bytes ``model``'s parameters and buffers hold, per device type."""
    held: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        where = (tensor.device.type, storage.data_ptr())
        if where not in seen:
            seen.add(where)
            held[where[0]] = held.get(where[0], 0) + storage.nbytes()
    return held


@functools.cache
def memory_budget(device_type: str) -> int:
    """What cached sites may hold of their own on ``device_type``.

    A share of its memory; for the host, of the container's limit where lower.
    """
    if device_type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(
            torch.cuda.current_device()
        ).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        total = min(total, _cgroup_memory_limit() or total)
    return int(total * CACHE_SHARE_OF_MEMORY)


def _cgroup_memory_limit() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit
