"""Machine hygiene (ops/env.py): the private Ray folder a command makes is gone when it exits."""

import json
import os
import subprocess
import sys

_SCRIPT = """
import json, os, sys
from pathlib import Path
from wardround.ops.env import apply_machine_hygiene
values = apply_machine_hygiene(Path(sys.argv[1]))
print(json.dumps({"dir": values["RAY_TMPDIR"], "made": os.path.isdir(values["RAY_TMPDIR"])}))
"""


def _hygiene_in_a_process(state: str, temp_root: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    environ.update(TMPDIR=temp_root, **env)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, state],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_long_state_path_gets_a_short_ray_folder_removed_at_exit(tmp_path):
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    state = tmp_path / ("state-" + "x" * 40)
    seen = _hygiene_in_a_process(str(state), str(temp_root))
    assert seen["made"] and os.path.basename(seen["dir"]).startswith("wr-ray-")
    assert os.path.dirname(seen["dir"]) == str(temp_root)
    assert list(temp_root.iterdir()) == []


def test_a_ray_folder_the_user_set_is_kept(tmp_path):
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    mine = tmp_path / "my-ray"
    seen = _hygiene_in_a_process(
        str(tmp_path / ("state-" + "x" * 40)), str(temp_root), RAY_TMPDIR=str(mine)
    )
    assert seen == {"dir": str(mine), "made": True}
    assert mine.is_dir() and list(temp_root.iterdir()) == []
