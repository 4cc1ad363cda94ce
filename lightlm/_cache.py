"""One protocol for every cached artefact (private; infrastructure layer).

Expensive, derived files (the de-quantized SmolLM2, chapter 7's fine-tuned teacher, chapter 8's top-k cache,
and every artefact to come) live under :func:`cache_dir` and go through :func:`ensure`, and nothing else:

* **Built aside, swapped in atomically.** A build writes into ``<name>.build-<pid>-<token>/`` next to the target,
  which becomes ``<name>.v-<token>/``; ``<name>`` itself is a symbolic link that is replaced in one
  ``os.replace``, so a reader always finds either the old complete artefact or the new one, never no folder.
* **One builder at a time.** A file lock (``.<name>.lock``) is held while building; a second process asking for
  the same artefact waits, then re-checks and loads what the first one built.
* **Verified on load.** The manifest (``lightlm-manifest.json``) records the SHA-256 and size of every file and
  the ``inputs`` the artefact was built from (recipe version, settings, package versions, the SHA-256 of the
  weights it was computed from). :func:`inspect` checks all of it; a changed input, a missing, truncated or
  altered file makes the artefact stale, and :func:`ensure` rebuilds it, saying which file failed.
* **Nothing left behind.** A build that raises removes its folder; one that was killed leaves a
  ``<name>.build-*`` folder that the next build (holding the lock, so no build is running) removes, together
  with superseded versions and the staging folders of lightlm 0.1 (``<name>.tmp<pid>``).

Hashes are memoised per process by (path, size, modification time, inode), so a second load in the same process
does not read the file again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import secrets
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

MANIFEST = "lightlm-manifest.json"
FORMAT = 2  # the manifest layout; 0.1's manifests (no "format") are stale


class CacheRebuildWarning(UserWarning):
    """A cached artefact failed its check (changed inputs, missing or corrupted file) and is being rebuilt."""


def cache_dir() -> Path:
    """Where built artefacts are cached: ``$LIGHTLM_CACHE`` or ``~/.cache/lightlm``."""
    return Path(os.environ.get("LIGHTLM_CACHE") or "~/.cache/lightlm").expanduser()


_hashes: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (memoised per path, size, mtime and inode)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _canonical(inputs: dict) -> dict:
    """JSON round trip: tuples become lists, so a manifest read back compares equal to the inputs."""
    if not isinstance(inputs, dict):
        raise TypeError(f"inputs must be a dict of JSON values, got {type(inputs).__name__}")
    return json.loads(json.dumps(inputs, sort_keys=True))


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a cached artefact, or None when it is missing or unreadable."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                return _first_difference(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{where}.{key}")
    return f"{where.lstrip('.') or 'inputs'} was {old!r}, now {new!r}"


def inspect(folder: str | os.PathLike, inputs: dict) -> str | None:
    """None if ``folder`` holds a complete artefact built from ``inputs``; otherwise why it does not."""
    folder = Path(folder)
    if not folder.exists():
        return "not built yet"
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != FORMAT:
        return f"{MANIFEST} is missing or from another version of lightlm"
    if manifest.get("inputs") != _canonical(inputs):
        return "built from other inputs: " + _first_difference(manifest.get("inputs"), _canonical(inputs))
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"file {name} is missing"
        size = path.stat().st_size
        if size != record.get("bytes"):
            return f"file {name} has {size:,} bytes, {record.get('bytes'):,} were written (truncated or altered)"
        if sha256_file(path) != record.get("sha256"):
            return f"file {name} failed its SHA-256 check (altered since it was written)"
    return None


# --------------------------------------------------------------------------- lock


@contextmanager
def _lock(path: Path, name: str, wait: bool = True):
    """An exclusive lock on ``path`` across processes (``fcntl.flock``; a lock folder where there is no fcntl).

    Yields True once the lock is held; with ``wait=False`` yields False at once if another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # Windows: mkdir is atomic; a crashed holder's folder has to be removed by hand
        folder = path.with_suffix(".lockdir")
        while True:
            try:
                folder.mkdir()
                break
            except FileExistsError:
                if not wait:
                    yield False
                    return
                time.sleep(0.5)
        try:
            yield True
        finally:
            folder.rmdir()
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if not wait:
                yield False
                return
            print(f"lightlm: waiting for another process that is building {name} ...", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- build and swap


def _leftovers(root: Path, name: str, keep: Path | None) -> list[Path]:
    """Folders of ``name`` that no reader needs: unfinished builds, 0.1's staging folders, old versions."""
    found = []
    for path in root.glob(f"{name}.*"):
        suffix = path.name[len(name):]
        if suffix.startswith((".build-", ".tmp", ".old-")) or (suffix.startswith(".v-") and path != keep):
            found.append(path)
    return found


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _swap(link: Path, version: Path) -> None:
    """Point ``link`` at ``version`` in one atomic step (a symbolic link replaced with ``os.replace``)."""
    if link.exists() and not link.is_symlink():  # lightlm 0.1 kept a plain folder here; move it aside first
        os.replace(link, link.with_name(f"{link.name}.old-{secrets.token_hex(4)}"))
    tmp_link = link.with_name(f"{link.name}.build-link-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.symlink(version.name, tmp_link, target_is_directory=True)
    except (OSError, NotImplementedError):  # no symbolic links (some Windows set-ups): a plain rename
        if link.exists():
            os.replace(link, link.with_name(f"{link.name}.old-{secrets.token_hex(4)}"))
        os.replace(version, link)
        return
    os.replace(tmp_link, link)


def _record(folder: Path) -> dict[str, dict]:
    return {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def ensure(name: str, inputs: dict, build: Callable[[Path], dict | None], *, quiet: bool = False) -> Path:
    """The folder of artefact ``name`` built from ``inputs``, building it first if needed (see the module doc).

    Args:
        name: the artefact's folder name under :func:`cache_dir`.
        inputs: JSON values describing everything the artefact is computed from; a change rebuilds it.
        build: ``build(staging)`` writes the artefact's files into the empty folder ``staging`` and returns a
            dict of facts to record in the manifest under ``"info"`` (or None). If it raises, nothing is kept.
        quiet: do not warn when an existing artefact is stale (it is rebuilt either way).

    Returns:
        ``cache_dir() / name`` (a symbolic link to the current version).
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    inputs = _canonical(inputs)
    root = cache_dir()
    link = root / name
    if inspect(link, inputs) is None:
        return link
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock", name):
        reason = inspect(link, inputs)  # another process may have built it while we waited
        if reason is None:
            return link
        if link.exists() and not quiet:
            warnings.warn(f"lightlm cache {link}: {reason}; rebuilding it (it is derived data: nothing needs "
                          f"reinstalling)", CacheRebuildWarning, stacklevel=2)
        current = link.resolve() if link.is_symlink() else None
        for path in _leftovers(root, name, keep=current):
            _remove(path)  # we hold the lock, so no build is running: these are unfinished or superseded
        token = secrets.token_hex(4)
        staging = root / f"{name}.build-{os.getpid()}-{token}"
        staging.mkdir()
        try:
            started = time.perf_counter()
            info = build(staging) or {}
            manifest = {"format": FORMAT, "name": name, "inputs": inputs, "files": _record(staging), "info": info,
                        "built": {"seconds": round(time.perf_counter() - started, 1), "python": platform.python_version(),
                                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            version = root / f"{name}.v-{token}"
            os.replace(staging, version)
        except BaseException:
            _remove(staging)
            raise
        _swap(link, version)
        for path in _leftovers(root, name, keep=version):
            _remove(path)
    return link


def sweep(name: str) -> list[Path]:
    """Remove what interrupted builds of ``name`` left behind, unless a build is running; returns what went."""
    root = cache_dir()
    if not root.is_dir():
        return []
    with _lock(root / f".{name}.lock", name, wait=False) as held:
        if not held:
            return []
        current = (root / name).resolve() if (root / name).is_symlink() else None
        gone = _leftovers(root, name, keep=current)
        for path in gone:
            _remove(path)
    return gone
