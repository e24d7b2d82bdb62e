"""What `pip install .` ships: every package folder, and the files the code reads.

An editable install reads the source tree, so a folder left out of pyproject's
package list only fails once installed from a wheel (the Docker image's
`pip install .`, a site's offline install).
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Read by people from a checkout (recipes, their docs), never by the code.
CHECKOUT_ONLY = {"deploy": ("*.md", "docker/*", "systemd/*")}


def _setuptools() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _package_dirs() -> dict[str, Path]:
    return {
        name: ROOT / folder for name, folder in _setuptools()["package-dir"].items()
    }


def test_every_listed_package_has_its_folder() -> None:
    config = _setuptools()
    assert set(config["packages"]) == set(config["package-dir"])
    for name, folder in _package_dirs().items():
        assert (folder / "__init__.py").is_file(), f"{name}: no {folder}/__init__.py"


def test_every_package_folder_is_listed() -> None:
    listed = {folder.resolve() for folder in _package_dirs().values()}
    roots = {ROOT / Path(*folder.relative_to(ROOT).parts[:1]) for folder in listed}
    for root in sorted(roots):
        for init in sorted(root.rglob("__init__.py")):
            folder = init.parent.resolve()
            assert folder in listed, (
                f"{folder.relative_to(ROOT)} is a package that `pip install .` leaves "
                "out: add it to [tool.setuptools] packages and package-dir"
            )


def test_every_data_file_ships() -> None:
    dirs = _package_dirs()
    package_data = _setuptools().get("package-data", {})
    folders = {folder.resolve() for folder in dirs.values()}
    for name, folder in dirs.items():
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix in {".py", ".pyc"}:
                continue
            # a file belongs to the nearest package folder above it
            owner = next(p for p in path.parents if p.resolve() in folders)
            if owner.resolve() != folder.resolve():
                continue
            relative = path.relative_to(folder).as_posix()
            patterns = package_data.get(name, []) + list(
                CHECKOUT_ONLY.get(folder.relative_to(ROOT).as_posix(), ())
            )
            assert any(fnmatch.fnmatch(relative, p) for p in patterns), (
                f"{path.relative_to(ROOT)} is not shipped: add it to "
                f"[tool.setuptools.package-data] {name!r}"
            )
