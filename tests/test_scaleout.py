"""lightlm.scaleout: DistillationTrainer under `accelerate launch` (2 processes, gloo on CPU) trains the same student
as one process with the same global batch, up to float rounding.

The multi-process tests start real launches in subprocesses (35 to 50 s together on a busy 2-core machine), so they are
marked slow; the command and argument tests are fast. Every subprocess gets a clean environment: offline, a fresh
HF_HOME (so a user's ``accelerate config`` file is not read) and no inherited RANK / WORLD_SIZE.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from lightlm import distill, scaleout

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process runs too: 1 torch thread, like each rank
ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"steps": 8, "global_batch": 8, "examples": 64, "lr": 0.5, "seed": 0}  # SGD, constant learning rate
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "ACCELERATE_USE_CPU")
# The 1- and 2-process students differ only by float32 rounding: the all-reduce adds the two half-batch gradients
# in another order than one process's mean over the batch (every run here uses 1 torch thread, so that is the only
# difference; 2 threads instead of 1 alone moved the 1-process student by 1.5e-8). Measured on this machine:
# max |difference| = 2.98e-8 = one float32 ulp (2^-25) of the weight that moved most (a classifier bias, 0 -> 0.46
# in 8 steps). The gap grows with lr x steps: 1.19e-7 after 32 steps, 2.6e-7 at lr 2.0 (and 3.7e-6 with AdamW,
# whose g / sqrt(v) magnifies rounding in near-zero gradients). TOLERANCE is 5x the measured gap for this run
# (8 SGD steps, lr 0.5), about 1.3 float32 eps at |w| = 1. A real difference (another global batch, another seed,
# or a gradient twice too large, as a summing all-reduce would give) moves the student by 3.7e-2 or more, 5 orders
# of magnitude above it.
TOLERANCE = 1.5e-7


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in DISTRIBUTED_VARIABLES}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")  # as torchrun sets it per process; 2 threads on 2 busy cores ran 8x slower
    return env


def _run(command: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result, time.perf_counter() - start


def _load(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process and the 1-process run, same global batch of 8: {processes: (student, stdout, out dir, s)}."""
    tmp = tmp_path_factory.mktemp("scaleout")
    found = {}
    for processes in (2, 1):
        out = tmp / f"out{processes}"
        command = scaleout.launch_command(processes, cpu=True, python=sys.executable, port=0, out=out, **OPTIONS)
        result, seconds = _run(command, tmp)
        found[processes] = _load(out / "student.safetensors"), result.stdout, out, seconds
    print(f"\n2 processes {found[2][3]:.1f} s, 1 process {found[1][3]:.1f} s, "
          f"max |difference| {_max_difference(found[1][0], found[2][0]):.3g}")
    return found


@pytest.mark.slow
def test_two_processes_train_the_same_student_as_one(runs):
    one, two = runs[1][0], runs[2][0]
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_another_global_batch_seed_or_gradient_scale_gives_another_student(runs, tmp_path):
    """The equality above can fail: each change below moves the student far beyond TOLERANCE. lr x 2 is what a
    DDP that summed the gradients instead of averaging them would do (with SGD; Adam would hide it)."""
    one = runs[1][0]
    for change in ({"global_batch": 16}, {"seed": 1}, {"lr": 2 * OPTIONS["lr"]}):
        options = {**OPTIONS, **change}
        student = _load(scaleout.train_student(tmp_path / str(change), cpu=True, **options))
        assert _max_difference(student, one) > 1e4 * TOLERANCE, change


@pytest.mark.slow
def test_training_moved_the_student_and_lowered_the_distillation_loss(runs):
    teacher, initial = scaleout.build_models(OPTIONS["seed"])
    assert [sum(p.numel() for p in model.parameters()) for model in (teacher, initial)] == [20_260, 3_556]
    data = scaleout.make_dataset(teacher, OPTIONS["examples"], OPTIONS["seed"])
    input_ids = torch.stack([item["input_ids"] for item in data])  # (64, 8)
    labels = torch.stack([item["labels"] for item in data])
    trained = scaleout.build_models(OPTIONS["seed"])[1]
    trained.load_state_dict(runs[2][0])
    assert _max_difference(trained.state_dict(), initial.state_dict()) > 0.1
    with torch.no_grad():
        teacher_logits = teacher(input_ids).logits
        before, after = (distill.distillation_loss(model(input_ids).logits, teacher_logits, labels, T=2.0, alpha=0.5)
                         for model in (initial, trained))
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_rank_zero_alone_writes_the_student_and_prints(runs):
    for processes, (_, stdout, out, _) in runs.items():
        assert sorted(p.name for p in out.iterdir()) == ["student.safetensors"], processes
        lines = stdout.strip().splitlines()
        per_process = OPTIONS["global_batch"] // processes
        assert len(lines) == 1 and lines[0].startswith(f"{processes} process(es) x {per_process} examples"), stdout


@pytest.mark.slow
def test_accelerate_launch_with_cpu_starts_one_process_and_the_script_says_so(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "lightlm.scaleout", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "started one process, not N" in result.stderr, result.stderr[-2000:]


# --------------------------------------------------------------------------- the command


def test_the_command_reads_as_a_reader_types_it():
    assert scaleout.launch_command(1) == ["python", "-m", "lightlm.scaleout", "--cpu"]
    assert scaleout.launch_command(2, steps=4) == [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
        "no", "--dynamo_backend", "no", "-m", "lightlm.scaleout", "--cpu", "--steps", "4"]
    assert "--cpu" not in scaleout.launch_command(4, cpu=False)  # multi-GPU: one process per GPU, NCCL


@given(processes=st.integers(2, 8), batches_per_process=st.integers(1, 4), steps=st.integers(1, 50),
       lr=st.floats(1e-4, 10), seed=st.integers(0, 2**32 - 1), optim=st.sampled_from(scaleout.OPTIMIZERS),
       cpu=st.booleans())
def test_accelerates_own_parser_reads_the_command_back(processes, batches_per_process, steps, lr, seed, optim, cpu):
    from accelerate.commands.launch import launch_command_parser

    options = {"steps": steps, "global_batch": processes * batches_per_process, "lr": lr, "seed": seed,
               "optim": optim, "examples": 2 * processes * batches_per_process, "out": "run"}
    command = scaleout.launch_command(processes, cpu=cpu, python="/any/python", port=0, **options)
    assert command[:3] == ["/any/python", "-m", "accelerate.commands.launch"]
    launch = launch_command_parser().parse_args(command[3:])
    assert launch.multi_gpu and not launch.cpu and launch.num_processes == processes and launch.num_machines == 1
    assert launch.mixed_precision == "no" and launch.dynamo_backend == "no" and launch.main_process_port == 0
    assert launch.module and launch.training_script == "lightlm.scaleout"
    script = scaleout.parse_args(launch.training_script_args)
    assert script.cpu == cpu and script.out == "run" and script.lr == lr
    assert {name: getattr(script, name) for name in options} == options
    assert script.global_batch % processes == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: scaleout.launch_command(0), ValueError, "num_processes must be >= 1, got 0"),
        (lambda: scaleout.launch_command(2.0), TypeError, "num_processes must be an int, got float"),
        (lambda: scaleout.launch_command(2, cpu="yes"), TypeError, "cpu must be True or False, got str"),
        (lambda: scaleout.launch_command(2, python=3), TypeError, "python must be a str .* got int"),
        (lambda: scaleout.launch_command(2, port=70000), ValueError, r"port must be in \[0, 65535\], got 70000"),
        (lambda: scaleout.launch_command(2, batch=8), ValueError, r"unknown option\(s\) \['batch'\]"),
        (lambda: scaleout.launch_command(4, global_batch=6, examples=12), ValueError,
         "global_batch must be a multiple of num_processes=4, got 6"),
        (lambda: scaleout.launch_command(2, global_batch=3), ValueError,
         "examples must be a multiple of global_batch=3, got 64"),
        (lambda: scaleout.launch_command(2, steps="8"), TypeError, "steps must be an int, got str"),
        (lambda: scaleout.launch_command(2, lr=0.0), ValueError, "lr must be > 0, got 0.0"),
        (lambda: scaleout.launch_command(2, optim="adam"), ValueError, "optim must be one of 'sgd', 'adamw_torch'"),
        (lambda: scaleout.train_student("out", steps=0), ValueError, "steps must be >= 1, got 0"),
        (lambda: scaleout.train_student("out", cpu=1), TypeError, "cpu must be True or False, got int"),
        (lambda: scaleout.build_models(-1), ValueError, r"seed must be in \[0, 4294967295\], got -1"),
        (lambda: scaleout.make_dataset(torch.nn.Linear(1, 1), 0), ValueError, "examples must be >= 1, got 0"),
    ],
)
def test_rejects_bad_arguments_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"global_batch must be a multiple of the number of processes \(3\), got 8"):
        scaleout.train_student("out")


def test_a_launch_that_started_one_process_instead_of_several_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(RuntimeError, match="started one process, not N"):
        scaleout.train_student("out")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--global-batch", "3"], "examples must be a multiple of global_batch=3, got 64"),
    (["--lr", "-1"], "lr must be > 0, got -1.0"),
    (["--optim", "adam"], "invalid choice: 'adam'"),
    (["--steps", "two"], "invalid int value: 'two'"),
])
def test_the_command_line_exits_with_status_2_naming_the_bad_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scaleout.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
