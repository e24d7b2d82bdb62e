"""What `launch` prints while it follows a run without a terminal (CI, a log
file): one line per completed round, and the final AUROC only after a round."""

import json

import pytest

from wardround.common.errors import FederationError
from wardround.server import launcher
from wardround.server.admin_cli import _follow_and_copy


def _run_dir(tmp_path, rounds_done, federation=None):
    run_dir = tmp_path / "state" / "runs" / "20261207-040131-4f37e74c"
    run_dir.mkdir(parents=True)
    (run_dir / launcher.LAUNCH_FILE).write_text(json.dumps({"name": run_dir.name}))
    final = {"global": {"auroc_macro": 0.507 if rounds_done == 0 else 0.812}}
    config = {"federation": federation or {"personal": [], "own-model-weight": 0.0}}
    (run_dir / "run.json").write_text(json.dumps({"final": final, "config": config}))
    return run_dir


def _follow_through(statuses, state, rounds_done):
    def fake_follow(coordinator, run_dir, on_progress):
        for status in statuses:
            on_progress(status)
        return launcher.FollowResult(
            state, "a reason", {"state": state, "rounds_done": rounds_done}
        )

    return fake_follow


def test_each_completed_round_gets_a_line_and_the_final_auroc(
    tmp_path, monkeypatch, capsys
):
    run_dir = _run_dir(tmp_path, rounds_done=2)
    statuses = [
        {"state": "running", "rounds_done": 0},
        {"state": "running", "rounds_done": 1},
        {"state": "running", "rounds_done": 1},
        {"state": "finished", "rounds_done": 2},
    ]
    monkeypatch.setattr(
        launcher, "follow", _follow_through(statuses, "finished", rounds_done=2)
    )

    _follow_and_copy(_coordinator(tmp_path), run_dir, tmp_path / "out", rounds=2)

    captured = capsys.readouterr()
    assert captured.err.count("round 1/2 done") == 1
    assert "round 2/2 done" in captured.err
    assert "final global AUROC 0.812" in captured.out


def test_a_run_stopped_before_any_round_does_not_call_its_auroc_final(
    tmp_path, monkeypatch, capsys
):
    run_dir = _run_dir(tmp_path, rounds_done=0)
    statuses = [{"state": "stopped", "rounds_done": 0, "reason": "a reason"}]
    monkeypatch.setattr(
        launcher, "follow", _follow_through(statuses, "stopped", rounds_done=0)
    )

    with pytest.raises(FederationError, match="stopped: a reason"):
        _follow_and_copy(_coordinator(tmp_path), run_dir, tmp_path / "out", rounds=2)

    out = capsys.readouterr().out
    assert "final global AUROC" not in out
    assert "no round completed" in out and "untrained" in out


def _coordinator(tmp_path):
    from types import SimpleNamespace

    return SimpleNamespace(state_path=tmp_path / "state")  # what the copy reads


@pytest.mark.parametrize(
    "federation",
    [{"personal": ["head"], "own-model-weight": 0.0}, {"own-model-weight": 0.5}],
)
def test_personalised_sites_auroc_is_not_called_a_global_models(
    tmp_path, monkeypatch, capsys, federation
):
    run_dir = _run_dir(tmp_path, rounds_done=2, federation=federation)
    statuses = [{"state": "finished", "rounds_done": 2}]
    monkeypatch.setattr(
        launcher, "follow", _follow_through(statuses, "finished", rounds_done=2)
    )

    _follow_and_copy(_coordinator(tmp_path), run_dir, tmp_path / "out", rounds=2)

    out = capsys.readouterr().out
    assert "final AUROC of the sites' personalised models 0.812" in out
    assert "global AUROC" not in out
