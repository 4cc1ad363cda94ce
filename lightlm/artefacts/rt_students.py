"""Chapter 7's students ("Distilling a classifier"): the recipe, and its runs trained once and cached.

The chapter compares six ways of training the same small student on Rotten Tomatoes (four methods, two
controls), three seeds each, after choosing the temperature ``T`` and the weight ``alpha`` of the soft term on
the validation split: 22 runs of 300 AdamW steps, about four minutes on two CPU cores, four times the chapter's
time budget. So the runs are a shared artefact, like the teacher they learn from: ``python -m lightlm.zoo warm``
trains them once (a progress bar per run) and caches the trained weights under ``rt-students/``, and the
chapter loads them, scores them live, and retrains one run to check that the cache holds what the recipe
gives. The capstone starts from the same recipe.

:class:`Recipe` is the whole recipe: the student (chapter 2's ``EncoderClassifier`` with the teacher's token
embeddings projected on their first 64 principal components, frozen), one loss per method, batches of
similar-length sentences in a seeded order, and one function per run. Only torch is imported at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distill
from .._cache import ensure, read_manifest
from ..train import pad, seed_everything, train_loop
from ..transformer import EncoderClassifier, TransformerConfig
from . import teachers

__all__ = ["SETTINGS", "METHODS", "CONTROLS", "Recipe", "rt_students_path", "rt_students_inputs",
           "build_rt_students", "load_rt_students", "warm_rt_students"]

SETTINGS = {"version": 1, "steps": 300, "batch": 32, "seeds": [0, 1, 2], "width": 64, "lr": 1e-3,
            "weight_decay": 0.01, "max_grad_norm": 1.0, "temperatures": [1.0, 2.0, 4.0, 8.0],
            "alphas": [0.0, 0.5, 0.9], "curve_every": 100, "threads": 2}
METHODS = ["hard labels", "logit KD", "logit + features", "logit KD + transfer set"]
CONTROLS = ["label smoothing", "hard + pseudo-labels"]
_NO_TEACHER_ON_LABELLED = ("hard labels", "label smoothing", "hard + pseudo-labels")
_USES_TRANSFER_SET = ("logit KD + transfer set", "hard + pseudo-labels")
_FOLDER, _WEIGHTS = "rt-students", "students.safetensors"


class Recipe:
    """Chapter 7's training recipe on the cached teacher outputs (``teachers.rt_teacher_outputs()``).

    ``run(method, seed, T, alpha)`` trains (once: runs are memoised in ``runs``) a fresh student for
    ``SETTINGS["steps"]`` AdamW steps and returns it in eval mode. Training runs on ``SETTINGS["threads"]`` CPU
    threads whatever the machine has, because a sum split over another number of threads rounds differently,
    and training amplifies rounding: a run retrained by a process like the one that built the cache (same CPU,
    same thread history) equals the cached one. Methods: :data:`METHODS` + :data:`CONTROLS`.
    """

    def __init__(self, outputs: dict, teacher, pad_token_id: int):
        self.labelled, self.validation, self.test = outputs["labelled"], outputs["validation"], outputs["test"]
        self.transfer_ids = outputs["unlabelled"].input_ids + outputs["plots"].input_ids
        self.transfer_logits = torch.cat([outputs["unlabelled"].logits, outputs["plots"].logits])
        width = SETTINGS["width"]
        embedding = teacher.bert.embeddings.word_embeddings.weight.detach()  # E: (V, 384)
        centred = embedding - embedding.mean(0)
        _, self.singular_values, right = torch.linalg.svd(centred, full_matrices=False)
        self.embedding = centred @ right[:width].T  # E_S = (E - mean) W_64: (V, 64), chapter 7 eq. (pca-init)
        self.config = TransformerConfig(vocab_size=embedding.shape[0], d_model=width, n_heads=4, n_layers=2,
                                        d_ff=256, max_len=64, pad_token_id=pad_token_id)
        # label smoothing with the teacher's average mass on the other class; hard pseudo-labels
        probabilities = self.labelled.logits.softmax(-1)
        elsewhere = 1 - probabilities.gather(1, self.labelled.labels[:, None])
        self.smoothing = round(2 * elsewhere.mean().item(), 2)  # ε/2 on the other class
        self.pseudo_labels = self.transfer_logits.argmax(-1)
        self.runs: dict[tuple, tuple[EncoderClassifier, list]] = {}
        self.on_run = None  # called with the key after each run is trained (a progress bar)

    def make_student(self, seed: int) -> EncoderClassifier:
        """A fresh student: seeded blocks, the teacher's projected embeddings, frozen."""
        seed_everything(seed)
        student = EncoderClassifier(self.config)
        with torch.no_grad():
            student.backbone.token_embedding.weight.copy_(self.embedding)
        student.backbone.token_embedding.weight.requires_grad_(False)
        return student

    def teacher_features(self, indices: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached last hidden states (b, L, 384) and attention with heads averaged in threes (b, 4, L, L)."""
        hidden = torch.zeros(len(indices), length, 384)
        attention = torch.zeros(len(indices), 12, length, length)
        for row, i in enumerate(indices):
            n = len(self.labelled.input_ids[i])
            hidden[row, :n] = self.labelled.hidden[i].float()
            attention[row, :, :n, :n] = self.labelled.attention[i].float()
        return hidden, attention.unflatten(1, (4, 3)).mean(2)  # heads 0-2, 3-5, ... averaged

    @staticmethod
    def length_batches(sequences: list[torch.Tensor], generator: torch.Generator):
        """Endless batches of indices of similar-length sentences (little padding), in a seeded order."""
        order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
        size = SETTINGS["batch"]
        chunks = [torch.tensor(order[i:i + size]) for i in range(0, len(order), size)]
        while True:
            for j in torch.randperm(len(chunks), generator=generator).tolist():
                yield chunks[j]

    @torch.no_grad()
    def correct(self, student: EncoderClassifier, split) -> torch.Tensor:
        """(n,) bool: is the student right on each sentence of a labelled split?"""
        student.eval()
        order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
        logits = torch.empty(len(split), 2)
        for start in range(0, len(order), 256):
            chunk = order[start:start + 256]
            logits[chunk] = student(*pad([split.input_ids[i] for i in chunk]))
        return logits.argmax(-1) == split.labels

    def evaluate(self, student: EncoderClassifier, split) -> float:
        """Accuracy on a labelled split."""
        return self.correct(student, split).float().mean().item()

    def labelled_loss(self, method: str, student, indices: torch.Tensor, T, alpha) -> torch.Tensor:
        """The loss on one batch of labelled sentences."""
        input_ids, mask = pad([self.labelled.input_ids[i] for i in indices])
        labels, teacher_logits = self.labelled.labels[indices], self.labelled.logits[indices]
        if method in ("hard labels", "hard + pseudo-labels"):
            return F.cross_entropy(student(input_ids, mask), labels)
        if method == "label smoothing":
            return F.cross_entropy(student(input_ids, mask), labels, label_smoothing=self.smoothing)
        if method == "logit + features":
            logits, hidden, weights = student.forward_features(input_ids, mask)
            teacher_hidden, teacher_attention = self.teacher_features(indices.tolist(), input_ids.shape[1])
            return (distill.distillation_loss(logits, teacher_logits, labels, T, alpha)
                    + distill.hidden_state_loss(hidden, teacher_hidden, student.projection, mask)
                    + distill.attention_loss(weights[-1], teacher_attention, mask))
        return distill.distillation_loss(student(input_ids, mask), teacher_logits, labels, T, alpha)

    def transfer_loss(self, method: str, student, indices: torch.Tensor, T, alpha) -> torch.Tensor:
        """The loss on one batch of transfer sentences (no label of their own)."""
        input_ids, mask = pad([self.transfer_ids[i] for i in indices])
        logits = student(input_ids, mask)
        if method == "hard + pseudo-labels":  # the teacher's arg-max as a hard label
            return F.cross_entropy(logits, self.pseudo_labels[indices])
        return alpha * distill.kd_loss(logits, self.transfer_logits[indices], T)  # the soft term only

    def train_student(self, method: str, seed: int, T, alpha, curve: bool = False):
        """One run: a fresh student, ``steps`` steps of ``method``; returns it and its validation curve."""
        student = self.make_student(seed)
        if method == "logit + features":
            student.projection = distill.HiddenProjection(SETTINGS["width"], 384)  # W_h, dropped after
        generator = torch.Generator().manual_seed(seed)
        labelled_batches = self.length_batches(self.labelled.input_ids, generator)
        transfer_batches = self.length_batches(self.transfer_ids, generator)
        history = []

        def loss_fn(student, step):
            if curve and step % SETTINGS["curve_every"] == 0:
                history.append((step, self.evaluate(student, self.validation)))
                student.train()
            loss = self.labelled_loss(method, student, next(labelled_batches), T, alpha)
            if method in _USES_TRANSFER_SET:
                loss = loss + self.transfer_loss(method, student, next(transfer_batches), T, alpha)
            return loss

        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
        threads = torch.get_num_threads()
        torch.set_num_threads(SETTINGS["threads"])  # sums split over threads round differently: fix their number
        try:
            train_loop(student, range(SETTINGS["steps"]), loss_fn, optimizer,
                       max_grad_norm=SETTINGS["max_grad_norm"], progress=False)
        finally:
            torch.set_num_threads(threads)
        if curve:
            history.append((SETTINGS["steps"], self.evaluate(student, self.validation)))
        if hasattr(student, "projection"):
            del student.projection
        return student, history

    @staticmethod
    def key(method: str, seed: int, T, alpha) -> tuple:
        """The memo key of a run; T and alpha play no part without the teacher's soft targets."""
        if method in _NO_TEACHER_ON_LABELLED:
            T, alpha = None, None
        return method, seed, T, alpha

    def run(self, method: str, seed: int, T, alpha) -> EncoderClassifier:
        """A memoised run (seed 0's runs record the validation curve)."""
        key = self.key(method, seed, T, alpha)
        if key not in self.runs:
            self.runs[key] = self.train_student(method, seed, T, alpha, curve=seed == 0)
            if self.on_run is not None:
                self.on_run(key)
        return self.runs[key][0]

    def sweep(self) -> dict:
        """T in ``temperatures`` at alpha = 0.5, then alpha in ``alphas`` at the best T: seed 0, logit KD,
        scored on the validation split (ties: the lower value)."""
        by_t = {T: self.evaluate(self.run("logit KD", 0, T, 0.5), self.validation) for T in SETTINGS["temperatures"]}
        best_t = max(by_t, key=lambda T: (by_t[T], -T))
        by_alpha = {a: self.evaluate(self.run("hard labels" if a == 0 else "logit KD", 0, best_t, a), self.validation)
                    for a in SETTINGS["alphas"]}
        best_alpha = max(by_alpha, key=lambda a: (by_alpha[a], -a))
        return {"by_temperature": by_t, "by_alpha": by_alpha, "best_T": best_t, "best_alpha": best_alpha}


def _name(key: tuple) -> str:
    return json.dumps(list(key))


def _build(staging: Path, progress: bool) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    tokenizer, teacher = teachers.load_rt_teacher(progress)
    recipe = Recipe(teachers.rt_teacher_outputs(progress), teacher, tokenizer.pad_token_id)
    settings = SETTINGS
    bar = tqdm(total=len(settings["temperatures"]) + len(settings["alphas"]) - 1, desc="chapter 7's students",
               disable=not progress)
    recipe.on_run = lambda key: bar.update()
    sweep = recipe.sweep()
    needed = {recipe.key(method, seed, sweep["best_T"], sweep["best_alpha"])
              for method in METHODS + CONTROLS for seed in settings["seeds"]}
    bar.total = bar.n + len(needed - set(recipe.runs))
    bar.refresh()
    for method in METHODS + CONTROLS:
        for seed in SETTINGS["seeds"]:
            recipe.run(method, seed, sweep["best_T"], sweep["best_alpha"])
    bar.close()
    tensors = {f"{_name(key)}/{name}": value.contiguous() for key, (student, _) in recipe.runs.items()
               for name, value in student.state_dict().items() if name != "backbone.token_embedding.weight"}
    save_file(tensors, str(staging / _WEIGHTS))
    return {"sweep": {**sweep, "by_temperature": list(sweep["by_temperature"].items()),
                      "by_alpha": list(sweep["by_alpha"].items())},
            "smoothing": recipe.smoothing,
            "runs": [[list(key), history] for key, (_, history) in recipe.runs.items()]}


def rt_students_path() -> Path:
    """Folder of the cached runs."""
    return teachers.rt_teacher_path().parent / _FOLDER


def rt_students_inputs() -> dict:
    """What the runs are computed from: :data:`SETTINGS`, the teacher's own inputs and torch's version."""
    return {"settings": SETTINGS, "teacher": teachers.rt_teacher_inputs(), "torch": torch.__version__}


def build_rt_students(progress: bool = True) -> Path:
    """The cached runs' folder, training them first if needed (about four minutes on two CPU cores)."""
    teachers.build_rt_teacher(progress)
    return ensure(_FOLDER, rt_students_inputs(), lambda staging: _build(staging, progress))


def load_rt_students(recipe: Recipe, progress: bool = True) -> dict:
    """Fill ``recipe.runs`` with the cached trained students and return the sweep's results.

    Returns ``{"by_temperature": {T: acc}, "by_alpha": {alpha: acc}, "best_T", "best_alpha", "smoothing"}``.
    """
    from safetensors.torch import load_file

    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a lightlm.artefacts.rt_students.Recipe, got {type(recipe).__name__}")
    folder = build_rt_students(progress)
    info = read_manifest(folder)["info"]
    if info["smoothing"] != recipe.smoothing:
        raise ValueError(f"the cache was built with label smoothing {info['smoothing']}, the recipe has "
                         f"{recipe.smoothing}: the teacher outputs differ; rebuild with `python -m lightlm.zoo warm`")
    tensors = load_file(str(folder / _WEIGHTS))
    for key, history in info["runs"]:
        key = tuple(key)
        student = recipe.make_student(key[1])
        prefix = _name(key) + "/"
        state = {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}
        student.load_state_dict({**state, "backbone.token_embedding.weight": recipe.embedding}, strict=True)
        student.eval()
        recipe.runs[key] = (student, [tuple(point) for point in history])
    sweep = info["sweep"]
    return {"by_temperature": dict(sweep["by_temperature"]), "by_alpha": dict(sweep["by_alpha"]),
            "best_T": sweep["best_T"], "best_alpha": sweep["best_alpha"], "smoothing": info["smoothing"]}


def warm_rt_students() -> str:
    """Train and cache chapter 7's runs (for ``python -m lightlm.zoo warm``); a one-line report."""
    info = read_manifest(build_rt_students(progress=True))["info"]
    return (f"{len(info['runs'])} runs cached; T = {info['sweep']['best_T']:g}, "
            f"alpha = {info['sweep']['best_alpha']:g}")
