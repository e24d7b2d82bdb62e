"""The site's FAB allowlist: approve, revoke, load, and which FABs may run."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from pathlib import Path

import pytest

from wardround.client.approvals import (
    APPROVALS_FILE,
    CLIENT_APP_REF,
    AppApprovals,
    Decision,
    fab_components,
    normalize_hash,
)
from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError
from wardround.flower_compat.tools import build_fab_from_disk
from wardround.server.launcher import APP_NAME, app_pyproject

HASH_A = "a" * 64
HASH_B = "0123456789abcdef" * 4


def _fab(tmp_path: Path, pyproject: str) -> tuple[bytes, str]:
    """A FAB built the way ``flwr run`` builds it, and its sha256."""
    folder = tmp_path / "app" / APP_NAME
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(pyproject)
    fab = build_fab_from_disk(folder)
    return fab, hashlib.sha256(fab).hexdigest()


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run_pyproject() -> str:
    return app_pyproject(RunConfig())


def test_normalize_hash_lowercases_and_strips():
    assert normalize_hash(f"  {HASH_B.upper()}\n") == HASH_B


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "a" * 63,
        "a" * 65,
        "g" * 64,
        f"sha256:{HASH_A}",
        HASH_A[:32] + " " + HASH_A[:31],
    ],
)
def test_normalize_hash_refuses_anything_but_64_hex_digits(text):
    with pytest.raises(ConfigError) as err:
        normalize_hash(text)
    assert "64 hex digits" in err.value.message
    assert "--print-hash" in err.value.hint


def test_approve_revoke_load_round_trip(tmp_path):
    approvals = AppApprovals(tmp_path / "state")
    assert approvals.load() == {}
    assert approvals.approve(HASH_B.upper(), note="pilot run") == HASH_B
    assert approvals.approve(HASH_A) == HASH_A

    # a fresh object reads what the first one wrote
    loaded = AppApprovals(tmp_path / "state").load()
    assert set(loaded) == {HASH_A, HASH_B}
    assert loaded[HASH_B]["note"] == "pilot run"
    assert loaded[HASH_A]["note"] == ""
    assert loaded[HASH_B]["approved_at"].endswith("+00:00")

    assert approvals.revoke(HASH_B) is True
    assert set(AppApprovals(tmp_path / "state").load()) == {HASH_A}
    assert approvals.revoke(HASH_B) is False  # already gone
    assert set(approvals.load()) == {HASH_A}


def test_approvals_file_is_private_and_written_whole(tmp_path):
    approvals = AppApprovals(tmp_path / "state")
    approvals.approve(HASH_A)
    path = tmp_path / "state" / APPROVALS_FILE
    assert approvals.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_suffix(".tmp").exists()
    assert list(json.loads(path.read_text())["approved"]) == [HASH_A]


def test_approve_refuses_a_malformed_hash_and_writes_nothing(tmp_path):
    approvals = AppApprovals(tmp_path)
    with pytest.raises(ConfigError):
        approvals.approve("not-a-hash")
    with pytest.raises(ConfigError):
        approvals.revoke("abc")
    assert not approvals.path.exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"apps": {}}),
        json.dumps(["a"]),
        json.dumps({"approved": 3}),
    ],
)
def test_a_damaged_approvals_file_is_a_config_error(tmp_path, content):
    approvals = AppApprovals(tmp_path)
    approvals.path.write_text(content)
    with pytest.raises(ConfigError) as err:
        approvals.load()
    assert str(approvals.path) in err.value.message
    assert "approve the apps again" in err.value.hint
    # approving on top of a damaged file is refused too, and keeps the file as it was
    with pytest.raises(ConfigError):
        approvals.approve(HASH_A)
    assert approvals.path.read_text() == content


def test_check_refuses_an_unlisted_hash_naming_the_approve_command(
    tmp_path, run_pyproject
):
    fab, fab_hash = _fab(tmp_path, run_pyproject)
    approvals = AppApprovals(tmp_path / "state")
    approvals.approve(HASH_A)  # some other app
    decision = approvals.check(fab_hash, fab)
    assert decision.approved is False
    assert "`wardround site approve --run-config run.toml" in decision.reason
    assert fab_hash[:16] in decision.reason


def test_check_accepts_a_listed_fab_built_from_the_launchers_pyproject(
    tmp_path, run_pyproject
):
    fab, fab_hash = _fab(tmp_path, run_pyproject)
    assert fab_components(fab)["clientapp"] == CLIENT_APP_REF
    approvals = AppApprovals(tmp_path / "state")
    approvals.approve(fab_hash)
    assert approvals.check(fab_hash, fab) == Decision(True)
    approvals.revoke(fab_hash)
    assert approvals.check(fab_hash, fab).approved is False


def test_check_refuses_a_listed_fab_with_another_clientapp(tmp_path, run_pyproject):
    foreign = run_pyproject.replace(CLIENT_APP_REF, "evil.client:app")
    assert foreign != run_pyproject
    fab, fab_hash = _fab(tmp_path, foreign)
    approvals = AppApprovals(tmp_path / "state")
    approvals.approve(fab_hash)
    decision = approvals.check(fab_hash, fab)
    assert decision.approved is False
    assert fab_hash in decision.reason and CLIENT_APP_REF in decision.reason


@pytest.mark.parametrize(
    "fab",
    [
        b"not a zip file",
        _zip({"README.md": "no pyproject"}),
        _zip({"pyproject.toml": "this is = = not toml"}),
        _zip({"pyproject.toml": "[project]\nname = 'x'\n"}),
    ],
)
def test_check_refuses_a_listed_fab_without_components(tmp_path, fab):
    assert fab_components(fab) == {}
    fab_hash = hashlib.sha256(fab).hexdigest()
    approvals = AppApprovals(tmp_path)
    approvals.approve(fab_hash)
    decision = approvals.check(fab_hash, fab)
    assert (
        not decision.approved
        and "does not run wardround's ClientApp" in decision.reason
    )


def test_fab_components_reads_the_components_table():
    fab = _zip(
        {
            "pyproject.toml": "[tool.flwr.app.components]\n"
            "serverapp = 'a.b:app'\nclientapp = 'c.d:app'\n"
        }
    )
    assert fab_components(fab) == {"serverapp": "a.b:app", "clientapp": "c.d:app"}


def test_describe_run_shows_the_sections_a_site_approves():
    from wardround.client.approvals import SHOWN_SECTIONS, describe_run

    run = RunConfig().with_overrides(
        privacy={"target_epsilon": 3.0}, secure_aggregation={"enabled": False}
    )
    lines = describe_run(run)
    headers = [line for line in lines if line.startswith("[")]
    assert headers == [f"[{section}]" for section in SHOWN_SECTIONS]
    assert "  target-epsilon = 3.0" in lines
    assert "  enabled = false" in lines  # secure aggregation off is shown plainly
    assert '  labels = ["nodule", "effusion", "pneumonia", "cardiomegaly"]' in lines
    assert "  batch-size = 0" in lines  # [train] decides what the site computes
    assert not any(line.startswith("  dir =") for line in lines)  # output: not shown


def test_a_value_cannot_redraw_what_the_operator_reads():
    """Strings are shown quoted and escaped: no line of their own, no cursor moves."""
    from wardround.client.approvals import describe_run

    run = RunConfig().with_overrides(model={"base": "pretrained"})
    lines = describe_run(run)
    assert '  base = "pretrained"' in lines
    with pytest.raises(ConfigError, match="model: base holds a control"):
        RunConfig.from_mapping(
            {"model": {"base": "pre\x1b[38A\r  enabled = true"}}, source="run.toml"
        )
    with pytest.raises(ConfigError, match=r"task: labels\[1\] holds a control"):
        RunConfig.from_mapping(
            {"task": {"labels": ["a", "b\u202e"]}}, source="run.toml"
        )


def test_a_refused_key_is_named_escaped_and_a_long_value_is_refused():
    """The refusal itself must not act on the terminal it is printed on."""
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_mapping({"train": {"\x1b[2J\x1b[Hfake": "x"}}, source="run.toml")
    assert "\x1b" not in str(refused.value) and "\\x1b[2J" in str(refused.value)
    with pytest.raises(ConfigError, match="longer than 1024 characters"):
        RunConfig.from_mapping({"model": {"vision": "x" * 1025}}, source="run.toml")
