"""``[data.ehr-database]`` settings refused with a message, before any connection."""

from __future__ import annotations

import pytest

from wardround.common.errors import ConfigError
from wardround.sitedata.ehr_database_config import EhrDatabaseSection


def _section(url: str, **extra: object) -> EhrDatabaseSection:
    return EhrDatabaseSection.model_validate(
        {"url": url, "table": "ehr", "password-env": "PG", **extra}
    )


@pytest.mark.parametrize("port", ["99999", "5432x", "0"])
def test_a_url_port_out_of_range_is_a_config_error(port):
    with pytest.raises(ConfigError, match="url port must be 1-65535"):
        _section(f"postgresql://reader@127.0.0.1:{port}/hospital")


def test_a_url_without_a_port_takes_the_default():
    section = _section("postgresql://reader@db.hospital.local/hospital")

    assert section.where == "postgresql://reader@db.hospital.local/hospital"


def test_query_timeout_s_defaults_to_ten_minutes_and_is_bounded():
    url = "postgresql://reader@127.0.0.1:5432/hospital"

    assert _section(url).query_timeout_s == 600
    for wrong in (0, 86_401):
        with pytest.raises(ValueError, match="query-timeout-s|query_timeout_s"):
            _section(url, **{"query-timeout-s": wrong})
