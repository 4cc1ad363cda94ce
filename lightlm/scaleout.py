"""Scaling distillation out with data parallelism: one script, one process or many (capstone chapter).

**Data parallelism.** Each of N processes holds a full replica of the student. A global batch of B examples is
cut into N shards of B/N; process n runs its shard forward and backward and gets the gradient of its shard's
mean loss, g_n = (N/B) Σ_{i ∈ shard n} ∇ℓ_i. An all-reduce then averages the N gradients, so every process
holds

    g = (1/N) Σ_n g_n = (1/B) Σ_{i=1}^{B} ∇ℓ_i,

exactly the gradient one process would compute on the whole batch. Every replica applies the same g to the same
weights (DistributedDataParallel broadcasts rank 0's weights at the start), so the replicas stay identical and
the run is one training run, up to float rounding: the all-reduce adds the terms in another order than a single
mean does. Memory: each process still holds the full model, its gradients and the optimizer state (16 bytes a
parameter with AdamW in fp32: 4 weight + 4 gradient + 8 for the two moments), and only the activations shrink,
to those of B/N examples; sharding the 16 bytes too is what ZeRO and FSDP add. Traffic: a ring all-reduce sends
2(N-1)/N times the gradient's bytes from each process every step, whatever B is.

**One run, any number of processes.** ``python -m lightlm.scaleout`` trains a tiny student BERT against a tiny
teacher with :class:`lightlm.distill_trainer.DistillationTrainer` in one process; the same file under
``accelerate launch --multi_gpu --num_processes N`` runs N processes (on CPU cores with the script's ``--cpu``
and the gloo backend, on GPUs with one process per GPU and NCCL). The global batch is fixed and the per-process
batch is B/N; the data are read in order (``train_sampling_strategy="sequential"``), so Accelerate's sharding
hands process n the n-th slice of each global batch and both runs see the same global batches. The optimizer is
plain SGD by default: Adam divides each update by the gradient's own size, so it would hide a gradient that is N
times too large, where SGD shows it. :func:`launch_command` writes the command; rank 0 alone saves the trained
student's ``state_dict`` as ``student.safetensors``.

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (Accelerate's multi-CPU launcher is
``mpirun``); ``--multi_gpu`` is what makes it start N processes through torchrun, and ``--cpu`` is then passed
to this script, which asks the Trainer for the CPU (gloo) instead of GPUs (NCCL).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from ._checks import check_bool, check_choice, check_int, check_real
from .train import seed_everything

__all__ = ["build_models", "make_dataset", "train_student", "launch_command", "parse_args", "main", "DEFAULTS",
           "OPTIMIZERS"]

DEFAULTS = {"steps": 8, "global_batch": 8, "examples": 64, "lr": 0.5, "seed": 0, "optim": "sgd"}
OPTIMIZERS = ("sgd", "adamw_torch")
VOCAB, SEQ_LEN, CLASSES = 50, 8, 4
FILENAME = "student.safetensors"


def _tiny_bert(hidden: int, layers: int, initializer_range: float) -> nn.Module:
    """A BertForSequenceClassification without dropout (dropout would draw different masks in each process)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=SEQ_LEN, num_labels=CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        initializer_range=initializer_range)
    return BertForSequenceClassification(config)


def build_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A seeded ``(teacher, student)`` pair of random tiny BERT classifiers (no download), both in fp32.

    Teacher: width 32, 2 layers, a wide initialization (std 0.5) so its logits are confident and varied;
    student: width 16, 1 layer (3,556 parameters against the teacher's 20,260). The same seed gives the same pair in
    every process.
    """
    seed_everything(check_int("seed", seed, min=0, max=2**32 - 1))
    teacher = _tiny_bert(32, 2, initializer_range=0.5)
    student = _tiny_bert(16, 1, initializer_range=0.02)
    return teacher.eval(), student


def make_dataset(teacher: nn.Module, examples: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``examples`` random token sequences of length 8 (a seeded generator), labelled by the teacher's arg-max.

    A task the student can learn from the teacher. Items are dicts of ``input_ids``, ``attention_mask`` (all
    ones: no padding) and ``labels``, as Hugging Face collators make them.
    """
    examples = check_int("examples", examples, min=1)
    generator = torch.Generator().manual_seed(check_int("seed", seed, min=0, max=2**32 - 1))
    input_ids = torch.randint(1, VOCAB, (examples, SEQ_LEN), generator=generator)  # (examples, seq)
    attention_mask = torch.ones_like(input_ids)
    device = next(teacher.parameters()).device
    with torch.no_grad():
        labels = teacher(input_ids.to(device), attention_mask=attention_mask.to(device)).logits.argmax(-1).cpu()
    return [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]}
            for i in range(examples)]


def _check_options(steps, global_batch, examples, lr, seed, optim) -> None:
    """The checks shared by :func:`train_student` and :func:`launch_command` (TypeError / ValueError)."""
    check_int("steps", steps, min=1)
    check_int("global_batch", global_batch, min=1)
    check_int("examples", examples, min=1)
    if examples % global_batch:  # else the last, short batch would be split (or padded) differently per run
        raise ValueError(f"examples must be a multiple of global_batch={global_batch}, got {examples}")
    check_real("lr", lr, min=0, min_open=True)
    check_int("seed", seed, min=0, max=2**32 - 1)
    check_choice("optim", optim, OPTIMIZERS)


def train_student(out: str | os.PathLike, *, steps: int = 8, global_batch: int = 8, examples: int = 64,
                  lr: float = 0.5, seed: int = 0, optim: str = "sgd", cpu: bool = False) -> Path | None:
    """Distil the tiny student from the tiny teacher with ``DistillationTrainer`` in this process's share of the run.

    Run once per process: alone (world size 1) or by each of the N processes a launcher starts (it sets
    ``WORLD_SIZE``). ``global_batch`` is split evenly, ``global_batch / N`` examples a process per step;
    ``steps`` optimizer steps at learning rate ``lr`` (``optim`` in :data:`OPTIMIZERS`); T = 2, α = 0.5.
    ``cpu`` uses the CPU (gloo) even where CUDA is found. Returns the path of the saved ``student.safetensors``
    in ``out`` on rank 0, None on the other ranks.
    """
    _check_options(steps, global_batch, examples, lr, seed, optim)
    check_bool("cpu", cpu)
    env = os.environ
    if env.get("ACCELERATE_USE_CPU") == "True" and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        raise RuntimeError("`accelerate launch --cpu --num_processes N` started one process, not N (its multi-CPU "
                           "launcher is mpirun): use `accelerate launch --multi_gpu --num_processes N ... "
                           "-m lightlm.scaleout --cpu` (see launch_command)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if global_batch % world_size:
        raise ValueError(f"global_batch must be a multiple of the number of processes ({world_size}), "
                         f"got {global_batch}")
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from .distill_trainer import DistillationTrainer

    out = Path(out)
    teacher, student = build_models(seed)
    dataset = make_dataset(teacher, examples, seed)
    # no shuffle: global batch k = examples [kB, (k+1)B) in any run (transformers 5; 4.x has no such option, and
    # its seeded random sampler hands every run the same global batches too)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    order = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in fields else {}
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=global_batch // world_size, max_steps=steps,
        learning_rate=lr, optim=optim, lr_scheduler_type="constant", weight_decay=0.0, seed=seed, **order,
        dataloader_drop_last=True, ddp_find_unused_parameters=False, use_cpu=cpu or not torch.cuda.is_available(),
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    if args.world_size != world_size:  # the processes would train separate copies, not one model
        raise RuntimeError(f"the launcher started {world_size} processes, but the Trainer sees a world of "
                           f"{args.world_size}: they would train {world_size} separate students")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=dataset, teacher_model=teacher,
                                  temperature=2.0, alpha=0.5)
    trainer.remove_callback(PrinterCallback)  # it would print the final metrics dict; main prints a summary
    trainer.train()
    if not trainer.is_world_process_zero():
        return None
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = out / FILENAME
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in student.state_dict().items()}, path)
    return path


def launch_command(num_processes: int = 2, *, cpu: bool = True, python: str | None = None,
                   port: int | None = None, **options) -> list[str]:
    """The command that runs this module in ``num_processes`` processes, as a list of arguments.

    One process: ``python -m lightlm.scaleout ...``. Several: ``accelerate launch --multi_gpu --num_processes N
    --num_machines 1 --mixed_precision no --dynamo_backend no -m lightlm.scaleout ...``. The launcher settings
    are all given, so no ``accelerate config`` file is needed (one that exists still fills in the others).
    ``cpu=True`` adds ``--cpu`` for the script (gloo on CPU cores); ``cpu=False`` is the multi-GPU variant, one
    process per GPU. ``python``: None writes the command as a reader types it; an interpreter path
    (``sys.executable``) gives one that runs that environment exactly. ``port``: the rendezvous port (0 = any
    free one; None = Accelerate's 29500). ``options``: the script's own, ``out``, ``steps``, ``global_batch``,
    ``examples``, ``lr``, ``seed``, ``optim`` (defaults: :data:`DEFAULTS`).
    """
    num_processes = check_int("num_processes", num_processes, min=1)
    check_bool("cpu", cpu)
    if python is not None and not isinstance(python, str):
        raise TypeError(f"python must be a str (an interpreter path) or None, got {type(python).__name__}")
    port = None if port is None else check_int("port", port, min=0, max=65535)
    unknown = sorted(set(options) - {*DEFAULTS, "out"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; allowed: {sorted({*DEFAULTS, 'out'})}")
    _check_options(**{**DEFAULTS, **{k: v for k, v in options.items() if k != "out"}})
    if num_processes > 1 and options.get("global_batch", DEFAULTS["global_batch"]) % num_processes:
        raise ValueError(f"global_batch must be a multiple of num_processes={num_processes}, "
                         f"got {options.get('global_batch', DEFAULTS['global_batch'])}")
    script = ["-m", "lightlm.scaleout", *(["--cpu"] if cpu else [])]
    for name, value in options.items():
        script += [f"--{name.replace('_', '-')}", str(value)]
    if num_processes == 1:
        return [python or "python", *script]
    launcher = ["accelerate", "launch"] if python is None else [python, "-m", "accelerate.commands.launch"]
    launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
    if port is not None:
        launcher += ["--main_process_port", str(port)]
    return [*launcher, *script]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightlm.scaleout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="scaleout-out", help="folder for student.safetensors (rank 0 writes it)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps")
    parser.add_argument("--global-batch", type=int, default=DEFAULTS["global_batch"],
                        help="examples per step, all processes together")
    parser.add_argument("--examples", type=int, default=DEFAULTS["examples"], help="size of the synthetic data")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the models and data")
    parser.add_argument("--optim", choices=OPTIMIZERS, default=DEFAULTS["optim"], help="optimizer")
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo) even where CUDA is found")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's options (``--help`` lists them); a bad value exits with status 2 and a message naming
    the option, as argparse does for a value of the wrong type."""
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        _check_options(options.steps, options.global_batch, options.examples, options.lr, options.seed,
                       options.optim)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return options


def main(argv: list[str] | None = None) -> Path | None:
    """Command-line entry point (``python -m lightlm.scaleout --help``); returns what :func:`train_student` does."""
    options = parse_args(argv)
    for name in ("torchao", "torch.utils._pytree"):  # harmless noise when transformers imports torchao on a CPU
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers import Trainer  # noqa: F401  (imported before the clock starts: a few seconds on a CPU)

    start = time.perf_counter()
    path = train_student(options.out, steps=options.steps, global_batch=options.global_batch,
                         examples=options.examples, lr=options.lr, seed=options.seed, optim=options.optim,
                         cpu=options.cpu)
    if path is not None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        seconds = time.perf_counter() - start
        print(f"{world_size} process(es) x {options.global_batch // world_size} examples = global batch "
              f"{options.global_batch}; {options.steps} steps, set-up included, in {seconds:.1f} s; saved {path}")
    return path


if __name__ == "__main__":
    main()
