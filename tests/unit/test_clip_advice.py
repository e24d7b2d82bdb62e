"""The coordinator says what to fix when every site clips its delta."""

from __future__ import annotations

import math

from wardround.server.records import SiteTrainReport
from wardround.server.run_report import clip_advice, round_record


def _report(node: int, clipped: bool, norm: float = math.nan) -> SiteTrainReport:
    return SiteTrainReport(
        node_id=node,
        site=f"site-{node}",
        num_examples=100,
        loss=0.5,
        steps=10,
        seconds=1.0,
        delta_l2=norm,
        bytes_sent=1000,
        delta_clipped=clipped,
    )


def _record(*train: SiteTrainReport):
    return round_record(3, list(train), [], [], "sha", 1.0, 0.1)


def test_every_site_clipped_names_the_round_the_norms_and_the_setting():
    advice = clip_advice(_record(_report(1, True, 17.7), _report(2, True, 14.2)), 4.0)
    assert advice is not None
    assert "round 3" in advice
    assert "14.2 to 17.7" in advice
    assert "federation.delta-clip-norm = 4" in advice


def test_norms_kept_home_still_give_the_advice_without_them():
    advice = clip_advice(_record(_report(1, True), _report(2, True)), 4.0)
    assert advice is not None and "L2 norms" not in advice


def test_no_advice_when_a_site_stayed_inside_the_bound_or_there_is_no_bound():
    assert (
        clip_advice(_record(_report(1, True, 9.0), _report(2, False, 3.0)), 4.0) is None
    )
    assert clip_advice(_record(_report(1, True, 9.0)), 0.0) is None
    assert clip_advice(_record(), 4.0) is None


def test_a_site_that_keeps_delta_clipped_home_reads_as_not_clipped():
    # Under SecAgg+ (and where a site's answer policy withholds it) the reply has
    # no delta-clipped metric: the coordinator cannot tell, so it says nothing.
    from wardround.common import wire
    from wardround.server.replies import train_report

    def name_of(node: int, index: int) -> str:
        return f"site-{node}"

    clipped = {wire.NUM_EXAMPLES: 100, wire.DELTA_CLIPPED: 1, wire.DELTA_L2: 9.0}
    withheld = {wire.NUM_EXAMPLES: 100}
    reports = [
        train_report(1, clipped, 1000, name_of),
        train_report(2, withheld, 1000, name_of),
    ]
    assert reports[1].delta_clipped is False
    assert clip_advice(_record(*reports), 4.0) is None
    assert clip_advice(_record(reports[0]), 4.0) is not None
