"""Training's stage folders are installed, not only importable from a checkout."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_training_package_is_listed_for_the_wheel() -> None:
    # setuptools installs only the packages it lists: an unlisted sub-package
    # imports in an editable install and is missing from the wheel (and from
    # the train image), as training/strategies/ once was.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(("tlserve", *init.parent.relative_to(ROOT).parts))
        for init in (ROOT / "training").rglob("__init__.py")
    }
    assert folders - set(setuptools["packages"]) == set()
