"""A site's cache (decoded images, DICOM index, PACS copies) is the site account's alone."""

from __future__ import annotations

import os
import stat

import pytest

from wardround.common.errors import ConfigError
from wardround.ops.private_folder import private_folder


@pytest.fixture
def shell_umask():
    """A login shell's umask: files and folders readable by every account."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path) -> int:  # noqa: ANN001
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_cache_folder_is_owner_only_whatever_the_umask(tmp_path, shell_umask):
    folder = private_folder(tmp_path / "site" / ".wardround-cache", "[data] cache-dir")
    assert folder.is_dir()
    assert _mode(folder) == 0o700


def test_a_loose_folder_of_the_sites_own_is_tightened(tmp_path, caplog):
    folder = tmp_path / "cache"
    folder.mkdir()
    os.chmod(folder, 0o755)
    private_folder(folder, "[data] cache-dir")
    assert _mode(folder) == 0o700
    assert "now 0700" in caplog.text


def test_a_folder_anyone_may_write_to_is_refused_not_tightened(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(ConfigError, match="other accounts") as refused:
        private_folder(shared, "[data] cache-dir")
    assert "chmod 700" in refused.value.hint
    assert _mode(shared) == 0o1777
