"""What `pip install .` ships: every package folder, and the files the code reads.

An editable install reads the source tree, so a folder left out of pyproject's
package list only fails once installed from a wheel (the Docker image's
`pip install .`, a site's offline install).
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Read by people from a checkout (recipes, their docs), never by the code.
CHECKOUT_ONLY = {"deploy": ("*.md", "docker/*", "systemd/*")}
# Top-level folders that are not part of the package.
NOT_SHIPPED = {"tests", "bench", "docs", "build"}


def _setuptools() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _package_dirs() -> dict[str, Path]:
    return {
        name: ROOT / folder for name, folder in _setuptools()["package-dir"].items()
    }


def _source_files() -> list[Path]:
    """The checkout's tracked files: what a release ships from, without a
    developer's editor leftovers."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name]


def test_every_listed_package_has_its_folder() -> None:
    config = _setuptools()
    assert set(config["packages"]) == set(config["package-dir"])
    for name, folder in _package_dirs().items():
        assert (folder / "__init__.py").is_file(), f"{name}: no {folder}/__init__.py"


def test_every_package_folder_is_listed() -> None:
    listed = {folder.resolve() for folder in _package_dirs().values()}
    for path in _source_files():
        top = path.relative_to(ROOT).parts[0]
        if path.name != "__init__.py" or top in NOT_SHIPPED or top.startswith("."):
            continue
        folder = path.parent.resolve()
        assert folder in listed, (
            f"{folder.relative_to(ROOT)} is a package that `pip install .` leaves "
            "out: add it to [tool.setuptools] packages and package-dir"
        )


def test_every_data_file_ships() -> None:
    dirs = _package_dirs()
    package_data = _setuptools().get("package-data", {})
    folders = {folder.resolve(): name for name, folder in dirs.items()}
    for path in _source_files():
        if path.suffix == ".py" or not any(
            parent.resolve() in folders for parent in path.parents
        ):
            continue
        # a file belongs to the nearest package folder above it
        owner = next(p for p in path.parents if p.resolve() in folders)
        name = folders[owner.resolve()]
        patterns = package_data.get(name, []) + list(
            CHECKOUT_ONLY.get(owner.relative_to(ROOT).as_posix(), ())
        )
        # setuptools globs as Path.glob does: '*' stops at a folder
        assert any(path in set(owner.glob(p)) for p in patterns), (
            f"{path.relative_to(ROOT)} is not shipped: add it to "
            f"[tool.setuptools.package-data] {name!r}"
        )
