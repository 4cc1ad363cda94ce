"""The one cache protocol (lightlm._cache): concurrency and faults, each in real subprocesses.

Every test builds a small artefact under a temporary LIGHTLM_CACHE (never the user's cache). The builder
(``TOY`` below) writes two files, sleeps if asked, and appends a line to a log outside the cache for each
build it starts, so a test can count builds across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightlm import _cache

TOY = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    from lightlm import _cache

    log = Path(os.environ["TOY_LOG"])
    inputs = json.loads(os.environ.get("TOY_INPUTS", '{"recipe": 1}'))

    def build(staging):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        (staging / "weights.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
        (staging / "sub").mkdir()
        (staging / "sub" / "notes.txt").write_text("hello")
        time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
        if os.environ.get("TOY_FAIL"):
            raise RuntimeError("the builder failed half-way")
        return {"answer": 42}

    folder = _cache.ensure("toy", inputs, build)
    print(hashlib.sha256((folder / "weights.bin").read_bytes()).hexdigest())
    print(json.dumps(_cache.read_manifest(folder)["info"]))
""")
EXPECTED = hashlib.sha256(bytes(range(256)) * 4096).hexdigest()


@pytest.fixture
def env(tmp_path):
    """A temporary cache and build log; the subprocess imports this checkout's lightlm."""
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "LIGHTLM_CACHE": str(tmp_path / "cache"), "TOY_LOG": str(tmp_path / "builds.log"),
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONWARNINGS": "always"}


def start(env, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TOY], env={**env, **extra}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(env, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TOY], env={**env, **extra}, capture_output=True, text=True,
                          timeout=120)


def builds(env) -> int:
    log = Path(env["TOY_LOG"])
    return len(log.read_text().split()) if log.exists() else 0


def cache_entries(env) -> list[str]:
    return sorted(p.name for p in Path(env["LIGHTLM_CACHE"]).iterdir() if not p.name.startswith(".toy.lock"))


def test_a_build_writes_a_verified_manifest_behind_a_link(env):
    done = run(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == EXPECTED
    link = Path(env["LIGHTLM_CACHE"]) / "toy"
    assert link.is_symlink() and link.resolve().name.startswith("toy.v-")
    manifest = _cache.read_manifest(link)
    assert manifest["inputs"] == {"recipe": 1} and manifest["info"] == {"answer": 42}
    assert manifest["files"] == {
        "sub/notes.txt": {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
        "weights.bin": {"bytes": 1 << 20, "sha256": EXPECTED}}
    assert cache_entries(env) == ["toy", link.resolve().name]  # nothing else left


def test_two_concurrent_warms_both_succeed_and_build_once(env):
    first, second = start(env, TOY_SLEEP="3"), start(env, TOY_SLEEP="3")
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert [out.split()[0] for out, _ in outputs] == [EXPECTED, EXPECTED]
    assert builds(env) == 1  # one built, the other waited and loaded it
    assert any("waiting for another process" in err for _, err in outputs)


def test_a_truncated_file_is_rebuilt_and_the_message_names_it(env):
    assert run(env).returncode == 0
    weights = Path(env["LIGHTLM_CACHE"]) / "toy" / "weights.bin"
    with open(weights, "r+b") as handle:
        handle.truncate(1000)
    done = run(env)
    assert done.returncode == 0 and done.stdout.split()[0] == EXPECTED
    assert builds(env) == 2
    assert "weights.bin has 1,000 bytes" in done.stderr and "rebuilding" in done.stderr
    assert "pip install" not in done.stderr  # a derived file: no package is blamed


def test_a_flipped_byte_of_the_same_size_is_caught_by_its_sha256(env):
    assert run(env).returncode == 0
    weights = Path(env["LIGHTLM_CACHE"]) / "toy" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[12345] ^= 0x01
    weights.write_bytes(bytes(data))
    done = run(env)
    assert done.returncode == 0 and done.stdout.split()[0] == EXPECTED
    assert builds(env) == 2
    assert "weights.bin failed its SHA-256 check" in done.stderr and "pip install" not in done.stderr


def test_a_missing_file_or_a_damaged_manifest_is_rebuilt(env):
    assert run(env).returncode == 0
    (Path(env["LIGHTLM_CACHE"]) / "toy" / "sub" / "notes.txt").unlink()
    done = run(env)
    assert done.returncode == 0 and "sub/notes.txt is missing" in done.stderr and builds(env) == 2
    (Path(env["LIGHTLM_CACHE"]) / "toy" / _cache.MANIFEST).write_text("{not json")
    done = run(env)
    assert done.returncode == 0 and "lightlm-manifest.json is missing" in done.stderr and builds(env) == 3


def test_changed_inputs_make_a_stale_manifest_and_rebuild(env):
    assert run(env).returncode == 0
    assert run(env).returncode == 0 and builds(env) == 1  # same inputs: loaded, not rebuilt
    done = run(env, TOY_INPUTS='{"recipe": 2}')
    assert done.returncode == 0 and builds(env) == 2
    assert "recipe was 1, now 2" in done.stderr
    assert _cache.read_manifest(Path(env["LIGHTLM_CACHE"]) / "toy")["inputs"] == {"recipe": 2}
    assert len(cache_entries(env)) == 2  # the link and the one current version: the old one is gone


def test_an_exception_mid_build_leaves_nothing_and_the_next_build_is_clean(env):
    failed = run(env, TOY_FAIL="1")
    assert failed.returncode != 0 and "the builder failed half-way" in failed.stderr
    assert cache_entries(env) == []  # no half-built folder, no link
    done = run(env)
    assert done.returncode == 0 and done.stdout.split()[0] == EXPECTED and builds(env) == 2


def test_a_killed_build_is_cleaned_up_by_the_next_build(env):
    victim = start(env, TOY_SLEEP="60")
    cache = Path(env["LIGHTLM_CACHE"])
    deadline = time.monotonic() + 60
    while not list(cache.glob("toy.build-*/weights.bin")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)  # no finally clause runs: the staging folder stays behind
    victim.communicate(timeout=30)
    assert [p.name for p in cache.glob("toy.build-*")], "the killed build left no staging folder to clean"
    done = run(env)
    assert done.returncode == 0 and done.stdout.split()[0] == EXPECTED
    assert not list(cache.glob("toy.build-*")) and len(cache_entries(env)) == 2


def test_a_rebuild_never_leaves_a_moment_without_the_folder(env):
    assert run(env).returncode == 0
    watcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        link = sys.argv[1]
        seen, end = 0, time.monotonic() + float(sys.argv[2])
        while time.monotonic() < end:
            seen += 1
            if not os.path.isdir(link):
                print("MISSING after", seen, "looks"); sys.exit(1)
        print("looked", seen, "times")
    """), str(Path(env["LIGHTLM_CACHE"]) / "toy"), "6"], stdout=subprocess.PIPE, text=True)
    for recipe in range(2, 7):  # five rebuilds, each swapping a new version in
        assert run(env, TOY_INPUTS=json.dumps({"recipe": recipe})).returncode == 0
    out, _ = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, out
    assert builds(env) == 6


def test_the_folders_of_lightlm_0_1_are_replaced_and_their_staging_removed(env):
    cache = Path(env["LIGHTLM_CACHE"])
    (cache / "toy").mkdir(parents=True)
    (cache / "toy" / "lightlm-manifest.json").write_text(json.dumps({"source_sha256": "x", "weights_bytes": 5}))
    (cache / "toy.tmp4242").mkdir()  # a 0.1 staging folder an interrupted build left behind
    (cache / "toy.tmp4242" / "model.safetensors").write_bytes(b"\0" * 100)
    done = run(env)
    assert done.returncode == 0 and builds(env) == 1
    assert (cache / "toy").is_symlink() and len(cache_entries(env)) == 2


def test_sweep_removes_leftovers_but_keeps_the_current_version(env):
    assert run(env).returncode == 0
    cache = Path(env["LIGHTLM_CACHE"])
    (cache / "toy.build-1-dead").mkdir()
    (cache / "toy.tmp77").mkdir()
    code = "from lightlm import _cache; print(len(_cache.sweep('toy')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2"], done.stderr
    assert run(env).returncode == 0 and builds(env) == 1  # the current version is intact


def test_ensure_rejects_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLM_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="plain folder name"):
        _cache.ensure("../escape", {}, lambda staging: None)
    with pytest.raises(ValueError, match="plain folder name"):
        _cache.ensure(".hidden", {}, lambda staging: None)
    with pytest.raises(TypeError, match="inputs must be a dict"):
        _cache.ensure("toy", ["recipe"], lambda staging: None)


def test_inspect_reports_why_a_folder_is_not_a_valid_artefact(tmp_path):
    assert _cache.inspect(tmp_path / "absent", {}) == "not built yet"
    assert "missing" in _cache.inspect(tmp_path, {})  # a folder with no manifest
