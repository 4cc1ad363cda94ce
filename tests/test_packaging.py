"""pyproject.toml against requirements.txt and scripts/setup.sh: what the wheel declares is what the book pins and
installs, and the Python versions they accept agree."""

import fnmatch
import importlib
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _pins() -> dict[str, str]:
    """requirements.txt as {canonical name: exact version}."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            pins[_canonical(requirement.name)] = spec.version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_dependency_is_pinned_in_requirements_and_the_pin_meets_its_bound():
    # setup.sh installs lightlm with --no-deps: a dependency missing from requirements.txt would be missing
    # from the book's environment
    pins = _pins()
    declared = [Requirement(d) for d in PROJECT["dependencies"]]
    declared += [Requirement(d) for extra in PROJECT.get("optional-dependencies", {}).values() for d in extra]
    missing = [str(r) for r in declared if _canonical(r.name) not in pins]
    assert not missing, f"in pyproject.toml but not pinned in requirements.txt: {missing}"
    outside = [f"{r} vs =={pins[_canonical(r.name)]}" for r in declared
               if not r.specifier.contains(pins[_canonical(r.name)], prereleases=True)]
    assert not outside, f"requirements.txt pins outside pyproject.toml's bounds: {outside}"


def test_requires_python_is_the_minimum_that_setup_sh_enforces():
    minimum = re.search(r"^MIN_PYTHON=(\d+\.\d+)\b", (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert minimum, "scripts/setup.sh must set MIN_PYTHON=X.Y"
    assert PROJECT["requires-python"] == f">={minimum.group(1)}"
    # and the old versions are refused, the minimum accepted
    major, minor = map(int, minimum.group(1).split("."))
    specifier = SpecifierSet(PROJECT["requires-python"])
    assert f"{major}.{minor}.0" in specifier and f"{major}.{minor - 1}.99" not in specifier


def test_the_wheel_includes_every_subpackage():
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lightlm").rglob("__init__.py"))
    left_out = [p for p in packages if not any(fnmatch.fnmatchcase(p, pattern) for pattern in found)]
    assert packages and not left_out, f"packages a wheel would leave out: {left_out}"


def test_console_scripts_point_at_functions_that_exist():
    for name, target in PROJECT.get("scripts", {}).items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute, None)), f"{name} = {target!r}"
