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
    with pytest.raises(ConfigError, match="not the cache's alone") as refused:
        private_folder(shared, "[data] cache-dir")
    assert "folder of its own" in refused.value.hint
    assert _mode(shared) == 0o1777


def test_a_folder_of_another_account_is_refused_even_when_it_is_0700(
    tmp_path, monkeypatch
):
    # made first by another account where the cache was to be: its owner could
    # read and swap every file the site writes there, whatever the mode
    import wardround.ops.private_folder as module

    planted = tmp_path / "cache"
    planted.mkdir(mode=0o700)
    owner = planted.stat().st_uid
    monkeypatch.setattr(module.os, "geteuid", lambda: owner + 1)
    with pytest.raises(ConfigError, match="belongs to another account"):
        private_folder(planted, "[data] cache-dir")


def test_the_sites_own_folder_or_one_above_it_is_not_tightened(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    os.chmod(site, 0o755)
    os.chmod(tmp_path, 0o755)
    for cache in (site, tmp_path):  # cache-dir = "." or ".."
        with pytest.raises(ConfigError, match="not the cache's alone"):
            private_folder(cache, "[data] cache-dir", holds=site)
        assert _mode(cache) == 0o755
    assert (
        _mode(private_folder(site / ".cache", "[data] cache-dir", holds=site)) == 0o700
    )


def test_a_file_system_that_ignores_chmod_is_refused(tmp_path, monkeypatch):
    import wardround.ops.private_folder as module

    folder = tmp_path / "mounted"
    folder.mkdir()
    os.chmod(folder, 0o755)
    monkeypatch.setattr(module.os, "chmod", lambda path, mode: None)
    with pytest.raises(ConfigError, match="keeps mode 0755"):
        private_folder(folder, "[data] cache-dir")
