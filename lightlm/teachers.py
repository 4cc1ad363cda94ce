"""A cached teacher for chapter 5 ("Distilling a classifier"): MiniLM fine-tuned on Rotten Tomatoes.

Fine-tuning the teacher takes a few CPU minutes; using it costs nothing once its outputs are stored. So
``python -m lightlm.zoo warm`` builds it once under ``LIGHTLM_CACHE`` (``rt-teacher-minilm/``):

* the fine-tuned ``BertForSequenceClassification`` (safetensors, config, tokenizer): :func:`load_rt_teacher`;
* for every split, the token ids (MiniLM's WordPiece tokenizer, at most ``max_length`` tokens) and the
  teacher's logits; for the labelled split also its last layer's hidden states and attention maps, the
  targets of hidden-state and attention distillation: :func:`rt_teacher_outputs`.

The splits of the semi-supervised setting the chapter studies (labels are dear, raw text is cheap):

* ``labelled``: the first ``n_labelled`` (2,000) sentences of ``zoo.rotten_tomatoes()["train"]``, the only
  labels the teacher and the students ever train on;
* ``unlabelled``: the other 8,202 training sentences, whose labels are kept only to score the teacher's
  pseudo-labels, never to train;
* ``plots``: :func:`lightlm.zoo.movie_plot_sentences`, in-domain text that never had a label;
* ``validation`` and ``test``: as in ``zoo.rotten_tomatoes()``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import zoo

SETTINGS = {"version": 1, "n_labelled": 2000, "epochs": 3, "batch_size": 32, "lr": 5e-5, "weight_decay": 0.01,
            "warmup": 0.1, "max_grad_norm": 1.0, "max_length": 64, "seed": 0}
SPLITS = ("labelled", "unlabelled", "plots", "validation", "test")
_FOLDER = "rt-teacher-minilm"
_OUTPUTS = "teacher-outputs.safetensors"
_TEXTS = "texts.json"


@dataclass
class SplitOutputs:
    """One split of the cache. Per sentence ``i``: ``input_ids[i]`` (L_i,) with [CLS] ... [SEP];
    ``logits`` (N, 2); ``labels`` (N,) or None; for ``labelled`` also ``hidden[i]`` (L_i, 384) and
    ``attention[i]`` (heads = 12, L_i, L_i), the teacher's last layer, float16."""

    texts: list[str]
    input_ids: list[torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = None
    attention: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def rt_teacher_path() -> Path:
    """Folder of the cached teacher and its outputs."""
    return zoo.cache_dir() / _FOLDER


def _cache_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / zoo._MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("file_bytes") or {}
    sizes_match = all((folder / name).is_file() and (folder / name).stat().st_size == size
                      for name, size in files.items())
    return manifest.get("settings") == SETTINGS and bool(files) and sizes_match


def _split_texts() -> dict[str, tuple[list[str], list[int] | None]]:
    data = zoo.rotten_tomatoes()
    n = SETTINGS["n_labelled"]
    train = data["train"]
    return {
        "labelled": (train["text"][:n], train["label"][:n]),
        "unlabelled": (train["text"][n:], train["label"][n:]),
        "plots": (zoo.movie_plot_sentences(), None),
        "validation": (data["validation"]["text"], data["validation"]["label"]),
        "test": (data["test"]["text"], data["test"]["label"]),
    }


def pad(sequences: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token-id tensors into ``(input_ids, attention_mask)``, each (batch, longest)."""
    if not sequences:
        raise ValueError("pad needs at least one sequence")
    longest = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    return ids, mask


def _fine_tune(model, ids: list[torch.Tensor], labels: list[int], progress: bool) -> list[float]:
    from .train import train_loop

    s = SETTINGS
    generator = torch.Generator().manual_seed(s["seed"])
    batches = []
    for _ in range(s["epochs"]):  # a fresh seeded shuffle per epoch
        order = torch.randperm(len(ids), generator=generator).tolist()
        batches += [order[i : i + s["batch_size"]] for i in range(0, len(order), s["batch_size"])]
    targets = torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    warmup = max(1, round(s["warmup"] * len(batches)))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to zero
        optimizer, lambda step: min((step + 1) / warmup, (len(batches) - step) / (len(batches) - warmup)))

    def loss_fn(model, batch):
        input_ids, mask = pad([ids[i] for i in batch])
        return model(input_ids=input_ids, attention_mask=mask, labels=targets[batch]).loss

    return train_loop(model, batches, loss_fn, optimizer, scheduler=schedule, max_grad_norm=s["max_grad_norm"],
                      progress=progress, desc="MiniLM teacher: fine-tune")


@torch.no_grad()
def _run_teacher(model, ids: list[torch.Tensor], features: bool, batch_size: int = 128):
    """Logits (N, 2); with ``features`` also the last layer's hidden states and attention maps per sentence."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    logits, hidden, attention = [None] * len(ids), [None] * len(ids), [None] * len(ids)
    for start in range(0, len(ids), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = pad([ids[i] for i in chunk])
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=features,
                    output_attentions=features)
        for row, i in enumerate(chunk):
            logits[i] = out.logits[row].float()
            if features:
                n = len(ids[i])
                hidden[i] = out.hidden_states[-1][row, :n].half()  # (L_i, 384)
                attention[i] = out.attentions[-1][row, :, :n, :n].half()  # (12, L_i, L_i)
    return torch.stack(logits), (hidden if features else []), (attention if features else [])


def build_rt_teacher(progress: bool = True) -> Path:
    """Fine-tune MiniLM on the labelled split (:data:`SETTINGS`), score it and cache it with its outputs."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .train import seed_everything

    folder = rt_teacher_path()
    source = zoo.minilm_dir()
    zoo.verify_sha256(source / "model.safetensors", zoo.MINILM_SHA256)
    zoo._offline()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    texts = _split_texts()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    ids = {split: [torch.tensor(row) for row in tokenizer(list(text), truncation=True,
                                                          max_length=SETTINGS["max_length"])["input_ids"]]
           for split, (text, _) in texts.items()}
    seed_everything(SETTINGS["seed"])  # the classifier head starts random
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head is "missing" from the checkpoint: expected, not news
    with zoo._quiet_loading():
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=2, local_files_only=True, use_safetensors=True, attn_implementation="eager",
            id2label=dict(enumerate(zoo.RT_LABEL_NAMES)), label2id={n: i for i, n in enumerate(zoo.RT_LABEL_NAMES)})
    hf_logging.set_verbosity(verbosity)
    losses = _fine_tune(model, ids["labelled"], texts["labelled"][1], progress)
    fine_tune_seconds = time.perf_counter() - started
    model.eval()
    tensors, accuracy = {}, {}
    for split in tqdm(SPLITS, desc="MiniLM teacher: cache outputs", disable=not progress):
        logits, hidden, attention = _run_teacher(model, ids[split], features=split == "labelled")
        tensors[f"{split}.ids"] = torch.cat(ids[split]).int()
        tensors[f"{split}.lengths"] = torch.tensor([len(seq) for seq in ids[split]])
        tensors[f"{split}.logits"] = logits
        if texts[split][1] is not None:
            tensors[f"{split}.labels"] = labels = torch.tensor(texts[split][1])
            accuracy[split] = (logits.argmax(-1) == labels).float().mean().item()
        if hidden:
            tensors[f"{split}.hidden"] = torch.cat(hidden)  # (Σ L_i, 384)
            tensors[f"{split}.attention"] = torch.cat([a.flatten() for a in attention])  # Σ 12·L_i²
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    save_file({name: t.contiguous() for name, t in tensors.items()}, staging / _OUTPUTS)
    (staging / _TEXTS).write_text(json.dumps({split: list(texts[split][0]) for split in SPLITS}))
    manifest = {
        "settings": SETTINGS, "accuracy": accuracy, "final_train_loss": losses[-1], "steps": len(losses),
        "fine_tune_seconds": round(fine_tune_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "file_bytes": {name: (staging / name).stat().st_size for name in ("model.safetensors", _OUTPUTS, _TEXTS)},
    }
    (staging / zoo._MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def _ensure(progress: bool) -> Path:
    folder = rt_teacher_path()
    if not _cache_ok(folder):
        build_rt_teacher(progress=progress)
    return folder


def rt_teacher_manifest(progress: bool = True) -> dict:
    """The cache's manifest: settings, the teacher's accuracy per split, build seconds, file sizes."""
    return json.loads((_ensure(progress) / zoo._MANIFEST).read_text())


def load_rt_teacher(progress: bool = True):
    """The fine-tuned teacher, ``(tokenizer, BertForSequenceClassification)`` in eval mode (built if missing).

    It loads with eager attention, so ``output_attentions=True`` returns the attention maps.
    """
    folder = _ensure(progress)
    zoo._offline()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with zoo._quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, attn_implementation="eager")
    return tokenizer, model.eval()


def rt_teacher_outputs(progress: bool = True) -> dict[str, SplitOutputs]:
    """Every split's token ids and teacher logits (and the labelled split's features): see the module doc."""
    from safetensors.torch import load_file

    folder = _ensure(progress)
    tensors = load_file(folder / _OUTPUTS)
    texts = json.loads((folder / _TEXTS).read_text())
    result = {}
    for split in SPLITS:
        lengths = tensors[f"{split}.lengths"].tolist()
        outputs = SplitOutputs(texts=texts[split], input_ids=list(tensors[f"{split}.ids"].long().split(lengths)),
                               logits=tensors[f"{split}.logits"], labels=tensors.get(f"{split}.labels"))
        if f"{split}.hidden" in tensors:
            outputs.hidden = list(tensors[f"{split}.hidden"].split(lengths))
            flat = tensors[f"{split}.attention"]
            heads = flat.numel() // sum(n * n for n in lengths)
            maps = flat.split([heads * n * n for n in lengths])
            outputs.attention = [a.view(heads, n, n) for a, n in zip(maps, lengths)]
        result[split] = outputs
    return result


def warm_rt_teacher() -> str:
    """``python -m lightlm.zoo warm rt-teacher``: build the cache unless it is already there."""
    folder = rt_teacher_path()
    if _cache_ok(folder):
        return f"cached at {folder}"
    build_rt_teacher(progress=True)
    accuracy = rt_teacher_manifest()["accuracy"]
    return f"built at {folder}; validation accuracy {accuracy['validation']:.3f}"
