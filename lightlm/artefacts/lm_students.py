"""Chapter 8's students ("Distilling a causal LM"): the recipes, and their runs trained once and cached.

Four students (text, token-level KD with the forward and the reverse KL, sequence-level KD) train from the same
start on the cached teacher outputs of :mod:`.lm_cache`, three seeds each; then each seed's text student is
continued by off-policy and by on-policy distillation, the second with the 135M-parameter teacher scoring the
student's own samples at every step. With a 49,152-way output layer in every student this is about two minutes
on two CPU cores, more than the chapter's time budget, so the runs are a shared artefact:
``python -m lightlm.zoo warm`` trains them once and caches the weights under ``lm-students/``, and the chapter
loads them, evaluates them live, and retrains one run to check that the cache holds what the recipe gives.

:class:`LMRecipe` is the whole recipe. Training runs on ``SETTINGS["threads"]`` CPU threads whatever the machine
has (a sum split over another number of threads rounds differently, and training amplifies rounding), so a
run retrained by a process like the one that built the cache (same CPU, same thread history) equals the cached
one. Only torch is imported at load time.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .. import objectives, onpolicy
from .._cache import ensure, read_manifest
from .._checks import check_int
from ..train import seed_everything, train_loop
from ..transformer import CausalLM, TransformerConfig
from . import lm_cache

__all__ = ["SETTINGS", "RECIPES", "ARMS", "LMRecipe", "lm_students_path", "lm_students_inputs",
           "build_lm_students", "load_lm_students", "warm_lm_students"]

SETTINGS = {"version": 1, "seeds": [0, 1, 2], "steps": 30, "batch": 8, "lr": 3e-3, "weight_decay": 0.01,
            "max_grad_norm": 1.0, "d_model": 64, "n_heads": 4, "n_layers": 2, "new": 8, "on_steps": 10,
            "on_batch": 8, "threads": 2}
RECIPES = ["text (cross-entropy)", "token-level KD, forward KL", "token-level KD, reverse KL", "sequence-level KD"]
ARMS = ["+ off-policy KD", "+ on-policy KD"]
_FOLDER, _WEIGHTS = "lm-students", "students.safetensors"


class LMRecipe:
    """Chapter 8's recipes on the cached teacher outputs (``lm_cache.load_lm_cache()``) and the live teacher
    (used only by on-policy distillation). ``students[name, seed]`` and ``continued[arm, seed]`` hold the
    trained models, ``curves[name, seed]`` the losses of every step."""

    def __init__(self, cache: dict, teacher):
        self.cache, self.teacher = cache, teacher
        self.train_ids, self.generated_ids = cache["train_ids"].long(), cache["generated_ids"].long()
        self.topk_values = cache["train_topk_values"]  # (windows, seq_len, k) fp16 log p
        self.topk_indices = cache["train_topk_indices"].long()
        config = cache["manifest"]["config"]
        self.k, self.prompt_len = config["k"], config["prompt_len"]
        self.config = TransformerConfig(vocab_size=teacher.config.vocab_size, d_model=SETTINGS["d_model"],
                                        n_heads=SETTINGS["n_heads"], n_layers=SETTINGS["n_layers"],
                                        max_len=config["seq_len"])
        self.scored = slice(self.prompt_len - 1, self.prompt_len - 1 + SETTINGS["new"])  # predict the new tokens
        self.students, self.curves, self.continued = {}, {}, {}

    def new_student(self, seed: int = 0) -> CausalLM:
        """A fresh student; the seed fixes its initial weights."""
        seed_everything(seed)
        return CausalLM(self.config)

    def kd_loss_on(self, logits: torch.Tensor, rows, direction: str, positions=slice(None)) -> torch.Tensor:
        """Token-level KD over the k + 1 outcomes of chapter 8 eq. (topk-bucket), either direction."""
        log_q_k = torch.log_softmax(logits, dim=-1).gather(-1, self.topk_indices[rows, positions])
        return onpolicy.token_divergence(onpolicy.bucket_log_probs(log_q_k),  # student: K and the tail
                                         onpolicy.bucket_log_probs(self.topk_values[rows, positions]),  # teacher
                                         direction)

    def loss_fn(self, name: str):
        """``loss_fn(model, rows)`` of a recipe: cross-entropy on a text, or token-level KD in a direction."""
        if name in ("text (cross-entropy)", "sequence-level KD"):
            source = self.train_ids if name.startswith("text") else self.generated_ids

            def text_loss(model, rows):
                return objectives.causal_lm_loss(model(source[rows]), source[rows])  # chapter 4, eq. (clm)
            return text_loss
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; known: {RECIPES}")
        direction = "forward" if name.endswith("forward KL") else "reverse"

        def token_kd_loss(model, rows):
            return self.kd_loss_on(model(self.train_ids[rows]), rows, direction)
        return token_kd_loss

    def arm_loss_fn(self, arm: str, seed: int):
        """The continuation's loss: the data's next tokens with the cached teacher (off-policy), or the student's
        own samples scored live by the teacher (on-policy), the same forward KL over k + 1 outcomes."""
        new, prompt_len = SETTINGS["new"], self.prompt_len
        if arm == ARMS[0]:
            def offpolicy_loss(model, rows):  # teacher forcing on the data's continuation
                logits = model(self.train_ids[rows, :prompt_len + new])[:, self.scored]
                return self.kd_loss_on(logits, rows, "forward", self.scored)
            return offpolicy_loss
        generator = torch.Generator().manual_seed(seed)

        def onpolicy_loss(model, rows):  # the student's own continuation, scored live
            return onpolicy.onpolicy_loss(model, self.teacher, self.train_ids[rows, :prompt_len], new, k=self.k,
                                          generator=generator)
        return onpolicy_loss

    def _train(self, model, batches, loss_fn) -> list[float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
        threads = torch.get_num_threads()
        torch.set_num_threads(SETTINGS["threads"])  # sums split over threads round differently: fix their number
        try:
            return train_loop(model, batches, loss_fn, optimizer, max_grad_norm=SETTINGS["max_grad_norm"],
                              progress=False)
        finally:
            torch.set_num_threads(threads)

    def train_student(self, name: str, seed: int, steps: int | None = None) -> tuple[CausalLM, list[float]]:
        """One run of section 8.5: ``steps`` (default ``SETTINGS["steps"]``) batches of ``batch`` windows in the
        seed's order, the same for every recipe; the seed also fixes the initial weights (shared by the four
        recipes). Fewer steps give the first steps of the full run."""
        steps = SETTINGS["steps"] if steps is None else check_int("steps", steps, min=1)
        order = torch.randperm(len(self.train_ids), generator=torch.Generator().manual_seed(seed))
        batches = list(order[:steps * SETTINGS["batch"]].split(SETTINGS["batch"]))
        student = self.new_student(seed)
        return student, self._train(student, batches, self.loss_fn(name))

    def continue_student(self, arm: str, seed: int, start: CausalLM) -> CausalLM:
        """One run of section 8.6: a copy of ``start`` continued for ``on_steps`` steps of ``on_batch`` prompts
        (the first ``prompt_len`` tokens of training windows, the same for both arms of a seed)."""
        order = torch.randperm(len(self.train_ids), generator=torch.Generator().manual_seed(seed + 10))
        batches = list(order[:SETTINGS["on_steps"] * SETTINGS["on_batch"]].split(SETTINGS["on_batch"]))
        student = copy.deepcopy(start)  # both arms start from the same weights
        self._train(student, batches, self.arm_loss_fn(arm, seed))
        return student


def lm_students_path() -> Path:
    """Folder of the cached runs."""
    return lm_cache.cache_path().parent / _FOLDER


def lm_students_inputs() -> dict:
    """What the runs are computed from: :data:`SETTINGS`, the LM cache's own inputs and torch's version."""
    return {"settings": SETTINGS, "lm_cache": lm_cache.lm_cache_inputs(), "torch": torch.__version__}


def _build(staging: Path, progress: bool) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .. import zoo

    recipe = LMRecipe(lm_cache.load_lm_cache(), zoo.load_smollm2()[1])
    seeds = SETTINGS["seeds"]
    with tqdm(total=len(seeds) * (len(RECIPES) + len(ARMS)), desc="chapter 8's students",
              disable=not progress) as bar:
        for seed in seeds:
            for name in RECIPES:
                recipe.students[name, seed], recipe.curves[name, seed] = recipe.train_student(name, seed)
                bar.update()
            for arm in ARMS:
                recipe.continued[arm, seed] = recipe.continue_student(arm, seed, recipe.students[RECIPES[0], seed])
                bar.update()
    tensors = {}
    for group, models in (("students", recipe.students), ("continued", recipe.continued)):
        for (name, seed), model in models.items():
            for key, value in model.state_dict().items():
                if key != "lm_head.weight":  # tied to the token embedding: stored once
                    tensors[f"{json.dumps([group, name, seed])}/{key}"] = value.contiguous()
    save_file(tensors, str(staging / _WEIGHTS))
    return {"curves": [[name, seed, curve] for (name, seed), curve in recipe.curves.items()]}


def build_lm_students(progress: bool = True) -> Path:
    """The cached runs' folder, training them first if needed (about two minutes on two CPU cores)."""
    lm_cache.build_lm_cache(progress=progress)
    return ensure(_FOLDER, lm_students_inputs(), lambda staging: _build(staging, progress))


def load_lm_students(recipe: LMRecipe, progress: bool = True) -> None:
    """Fill ``recipe.students``, ``recipe.curves`` and ``recipe.continued`` with the cached runs."""
    from safetensors.torch import load_file

    if not isinstance(recipe, LMRecipe):
        raise TypeError(f"recipe must be a lightlm.artefacts.lm_students.LMRecipe, got {type(recipe).__name__}")
    folder = build_lm_students(progress)
    tensors = load_file(str(folder / _WEIGHTS))
    states: dict[tuple, dict] = {}
    for key, value in tensors.items():
        prefix, name = key.split("/", 1)
        group, recipe_name, seed = json.loads(prefix)
        states.setdefault((group, recipe_name, seed), {})[name] = value
    for (group, name, seed), state in states.items():
        model = CausalLM(recipe.config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing != ["lm_head.weight"] or unexpected:  # the head is tied to the embedding
            raise ValueError(f"the cached {group} {name!r}, seed {seed}, does not fit the recipe's student: "
                             f"missing {missing}, unexpected {unexpected}")
        model.eval()
        (recipe.students if group == "students" else recipe.continued)[name, seed] = model
    for name, seed, curve in read_manifest(folder)["info"]["curves"]:
        recipe.curves[name, seed] = curve


def warm_lm_students() -> str:
    """Train and cache chapter 8's runs (for ``python -m lightlm.zoo warm``); a one-line report."""
    info = read_manifest(build_lm_students(progress=True))["info"]
    return f"{len(info['curves'])} students and their continuations cached"
