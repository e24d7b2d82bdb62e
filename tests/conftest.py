"""Shared fixtures: machine hygiene for Flower/Ray, tiny configs, synthetic sites."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from wardround.common.config import RunConfig
from wardround.ops.env import apply_machine_hygiene


@pytest.fixture(scope="session", autouse=True)
def _machine_hygiene(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("flwr-state")
    # Bases the tests build (the public pretrained base, once per session) go to
    # the session's temporary folder, not the user's cache.
    os.environ["WARDROUND_CACHE"] = str(tmp_path_factory.mktemp("wardround-cache"))
    os.environ.pop("FLWR_HOME", None)
    os.environ.pop("RAY_TMPDIR", None)
    values = apply_machine_hygiene(state)
    yield
    if Path(values["RAY_TMPDIR"]).name.startswith("wr-ray-"):
        shutil.rmtree(values["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_config() -> RunConfig:
    """The default model, small enough for unit tests, on a random base.

    Tests of the pretrained base build it themselves (tests/unit/test_pretrained_base.py).
    """
    return RunConfig().with_overrides(
        model={"image_size": 32, "max_note_tokens": 32, "base": "random"},
        train={"batch_size": 8},
    )


def _unreachable_budget(root: Path) -> None:
    # Many tests train these sites: give them a lifetime budget no test reaches.
    # Budget and floor tests write their own site.toml.
    for site_toml in root.glob("*/site.toml"):
        text = site_toml.read_text()
        site_toml.write_text(
            text.replace("budget-epsilon = 100.0", "budget-epsilon = 1000000.0")
        )


@pytest.fixture(scope="session")
def synthetic_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic hospitals, written once per test session (no SecAgg+:
    sites refuse it among fewer than 3)."""
    from wardround.synthetic.hospitals import synthesize_federation

    root = tmp_path_factory.mktemp("sites")
    synthesize_federation(root, 2, patients_per_site=40, seed=7)
    _unreachable_budget(root)
    return root


@pytest.fixture(scope="session")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic hospitals: the fewest SecAgg+ runs with."""
    from wardround.synthetic.hospitals import synthesize_federation

    root = tmp_path_factory.mktemp("three-sites")
    synthesize_federation(root, 3, patients_per_site=40, seed=11)
    _unreachable_budget(root)
    return root


@pytest.fixture
def clean_three_sites(three_sites, tmp_path) -> list[Path]:
    """Fresh copies of the three hospitals' folders: no ledger, answers or audit."""
    import shutil

    root = tmp_path / "sites"
    shutil.copytree(
        three_sites,
        root,
        ignore=shutil.ignore_patterns("privacy-ledger", ".wardround-site"),
    )
    return sorted(p for p in root.iterdir() if (p / "site.toml").is_file())


@pytest.fixture(scope="module")
def task_identity():
    """Flower stamps messages with the process's task identity, as a SuperLink sets it."""
    from wardround.flower_compat.runtime import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
