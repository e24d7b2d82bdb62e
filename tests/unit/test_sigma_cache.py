"""Sigma planning remembered on disk: shared by sites, never trusted blindly."""

from __future__ import annotations

import json
import threading
import time

import pytest

from wardround.client import sigma_cache
from wardround.client.sigma_cache import planned_sigma
from wardround.common.config import Accountant
from wardround.common.privacy import Mechanism, epsilon_spent, plan_noise_multiplier

QUESTION = (8.0, 1e-5, 0.05, 400, Accountant.RDP)


def _refuse_to_plan(*args, **kwargs):
    raise AssertionError("planned again: the cache was not used")


def test_the_first_site_plans_and_the_next_reads_the_same_sigma(tmp_path, monkeypatch):
    first = planned_sigma(*QUESTION, tmp_path)

    assert first == plan_noise_multiplier(*QUESTION)
    assert len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setattr(sigma_cache, "plan_noise_multiplier", _refuse_to_plan)
    assert planned_sigma(*QUESTION, tmp_path) == first


def test_each_question_has_its_own_answer(tmp_path):
    rdp = planned_sigma(*QUESTION, tmp_path)
    fewer_steps = planned_sigma(8.0, 1e-5, 0.05, 100, Accountant.RDP, tmp_path)

    assert fewer_steps < rdp
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_prv_answer_is_remembered_too(tmp_path, monkeypatch):
    question = (3.0, 1e-5, 0.05, 200, Accountant.PRV)
    first = planned_sigma(*question, tmp_path)
    monkeypatch.setattr(sigma_cache, "plan_noise_multiplier", _refuse_to_plan)
    assert planned_sigma(*question, tmp_path) == first


def test_a_sigma_edited_smaller_is_planned_again_and_rewritten(tmp_path, caplog):
    honest = planned_sigma(*QUESTION, tmp_path)
    (path,) = tmp_path.glob("*.json")
    entry = json.loads(path.read_text())
    entry["sigma"] = honest / 2  # more epsilon than the site agreed to
    path.write_text(json.dumps(entry))
    spent = epsilon_spent([Mechanism(honest / 2, 0.05, 400)], 1e-5, Accountant.RDP)
    assert spent > 8.0

    assert planned_sigma(*QUESTION, tmp_path) == honest
    assert "which spends epsilon 43" in caplog.text
    assert json.loads(path.read_text())["sigma"] == honest


@pytest.mark.parametrize("factor", [1.5, 1e6, 1e-300, 1e300])
def test_a_sigma_edited_larger_or_absurd_is_planned_again(tmp_path, factor):
    """Too much noise ruins the site's update; an absurd one breaks the accountant."""
    honest = planned_sigma(*QUESTION, tmp_path)
    (path,) = tmp_path.glob("*.json")
    entry = json.loads(path.read_text())
    entry["sigma"] = honest * factor if factor > 1e-300 else factor
    path.write_text(json.dumps(entry))

    assert planned_sigma(*QUESTION, tmp_path) == honest
    assert json.loads(path.read_text())["sigma"] == honest


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"sigma": "x"}',
        '{"question": {}, "sigma": 2.0}',
        '{"question": null, "sigma": -1}',
    ],
)
def test_a_damaged_or_foreign_file_is_planned_again(tmp_path, content):
    honest = planned_sigma(*QUESTION, tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text(content)

    assert planned_sigma(*QUESTION, tmp_path) == honest
    assert json.loads(path.read_text())["sigma"] == honest


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_fifo_or_a_link_in_place_of_the_file_neither_blocks_nor_is_followed(
    tmp_path, kind
):
    import os

    honest = planned_sigma(*QUESTION, tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block for ever
    else:
        target = tmp_path / "elsewhere.txt"
        target.write_text(json.dumps({"sigma": honest * 3}))
        path.symlink_to(target)

    assert planned_sigma(*QUESTION, tmp_path) == honest
    assert path.is_file() and not path.is_symlink()  # rewritten as a plain file


def test_a_lock_held_too_long_is_planned_around(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(sigma_cache, "LOCK_WAIT_S", 0.3)
    planned_sigma(*QUESTION, tmp_path)
    (lock,) = tmp_path.glob("*.lock")
    with lock.open("a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process that never lets go
        started = time.monotonic()
        assert planned_sigma(*QUESTION, tmp_path) == plan_noise_multiplier(*QUESTION)
        assert time.monotonic() - started < 5


def test_an_unusable_cache_plans_without_it(tmp_path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the folder should be")

    assert planned_sigma(*QUESTION, blocked) == plan_noise_multiplier(*QUESTION)
    assert planned_sigma(*QUESTION, None) == plan_noise_multiplier(*QUESTION)


def test_sites_asking_at_once_wait_for_one_search(tmp_path, monkeypatch):
    searches = []

    def slow_plan(*args):
        searches.append(args)
        time.sleep(0.3)
        return plan_noise_multiplier(*args)

    monkeypatch.setattr(sigma_cache, "plan_noise_multiplier", slow_plan)
    answers: list[float] = []
    sites = [
        threading.Thread(
            target=lambda: answers.append(planned_sigma(*QUESTION, tmp_path))
        )
        for _ in range(4)
    ]
    for site in sites:
        site.start()
    for site in sites:
        site.join()

    assert len(searches) == 1
    assert answers == [plan_noise_multiplier(*QUESTION)] * 4
