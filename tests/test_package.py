"""Packaging contracts: light imports, pins, the setup entry points."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import lightlm

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("transformers", "datasets", "matplotlib", "ipywidgets", "peft", "pandas", "accelerate", "gguf")


def test_import_lightlm_imports_only_torch_and_numpy():
    code = "import sys, lightlm; [getattr(lightlm, m) for m in lightlm._SUBMODULES]; " \
           "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "torch" in loaded and "numpy" in loaded
    assert not set(HEAVY) & set(loaded), set(HEAVY) & set(loaded)


def test_requirements_pin_every_package_and_torch_first():
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [l for l in lines if l]
    assert lines[0] == "torch==2.13.0"
    assert all("==" in l for l in lines), [l for l in lines if "==" not in l]


def test_pyproject_uses_loose_lower_bounds_so_colab_keeps_its_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == lightlm.__version__
    assert any(d.startswith("torch>=") for d in project["dependencies"])
    assert not any("==" in d or "<" in d for d in project["dependencies"])
    assert not any(d.startswith("ipywidgets") for d in project["dependencies"])  # Colab ships its own


def test_setup_prints_versions_and_seeds(capsys):
    import torch

    found = lightlm.versions()
    assert lightlm.setup(seed=7) is None
    first = torch.rand(2)
    lightlm.setup(seed=7, quiet=True)
    assert torch.equal(first, torch.rand(2))
    printed = capsys.readouterr().out
    assert f"torch {found['torch']}" in printed and "seed 7" in printed


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(bash scripts/\S+\.sh)$", readme, re.M)
    assert "bash scripts/book.sh" in commands and "bash scripts/test.sh" in commands
    assert "bash scripts/test.sh" in ci


def test_setup_quiets_torchaos_import_noise_but_not_errors():
    """torchao, imported by transformers when a model loads, logs that its CUDA extensions do not load on a CPU
    machine: after lightlm.setup() the chapters' outputs do not carry those lines; an error still shows."""
    import subprocess
    import sys

    script = ("import logging, lightlm; lightlm.setup(quiet=True); import torchao; "
              "logging.getLogger('torchao').error('an error still shows')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "_pytree" not in done.stderr
    assert "an error still shows" in done.stderr


def test_setup_hides_pefts_gradient_checkpointing_future_warning_only():
    """PEFT 0.21 calls a transformers method that warns of its renaming each time it wraps a model; after
    lightlm.setup() chapter 12's outputs do not carry it, and any other FutureWarning still shows."""
    import subprocess
    import sys

    script = ("import warnings, lightlm; lightlm.setup(quiet=True); "
              "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed', FutureWarning); "
              "warnings.warn('another deprecation', FutureWarning)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "is_gradient_checkpointing" not in done.stderr and "another deprecation" in done.stderr
