"""The ServerApp refuses a simulation that could never reach min-sites."""

import pytest

from wardround.common.config import RunConfig
from wardround.common.errors import ConfigError
from wardround.server.app import check_simulated_nodes


def test_too_few_simulated_supernodes_is_a_config_error_that_says_how_to_fix_it():
    config = RunConfig()  # SecAgg+ on: min-sites 3
    with pytest.raises(ConfigError, match="2 SuperNode") as err:
        check_simulated_nodes(2, config)
    assert "--num-supernodes 3" in (err.value.hint or "")
    check_simulated_nodes(3, config)
    check_simulated_nodes(0, config)  # nodes not connected yet: the join wait decides
