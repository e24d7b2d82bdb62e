"""A site's release travels as three numbers and reads back as major.minor.patch."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wardround.client.answers import coarsen_metrics
from wardround.client.egress import WIRE_METRIC_NAMES
from wardround.common import wire
from wardround.common.release import version_from_metrics, version_metrics
from wardround.sitedata.site_config import SiteAnswers


@given(st.tuples(*[st.integers(0, 999_999)] * 3))
def test_a_release_reads_back_as_it_left(parts):
    text = ".".join(map(str, parts))
    assert version_from_metrics(version_metrics(text)) == text


@pytest.mark.parametrize(
    ("version", "shown"),
    [("0.2.0rc1", "0.2.0"), ("1.4", "1.4.0"), ("0.1.0+local", "0.1.0")],
)
def test_suffixes_stay_home_and_short_releases_are_padded(version, shown):
    assert version_from_metrics(version_metrics(version)) == shown


def test_a_version_that_does_not_parse_sends_nothing():
    assert version_metrics("not a version") == {}


@pytest.mark.parametrize(
    "bad",
    [-1, 1.5, math.nan, math.inf, 10**6, True, "1", None],
)
def test_a_reply_with_a_part_out_of_shape_states_no_release(bad):
    metrics = {**version_metrics("1.2.3"), wire.VERSION_MINOR: bad}
    assert version_from_metrics(metrics) is None


def test_the_release_may_leave_and_the_site_may_keep_it_home():
    sent = version_metrics("1.2.3")
    assert set(sent) <= WIRE_METRIC_NAMES
    default = coarsen_metrics(sent, SiteAnswers(), secure_aggregation=True)
    assert default == sent
    narrowed = SiteAnswers(metrics=[wire.AUROC_MACRO])
    assert coarsen_metrics(sent, narrowed, secure_aggregation=False) == {}


def test_the_site_budget_always_leaves_with_its_accounting():
    assert wire.DP_EPSILON_BUDGET in wire.ACCOUNTING_METRICS
    narrowed = SiteAnswers(metrics=[wire.AUROC_MACRO])
    kept = coarsen_metrics(
        {wire.DP_EPSILON_BUDGET: 10.0}, narrowed, secure_aggregation=True
    )
    assert kept == {wire.DP_EPSILON_BUDGET: 10.0}
