"""Chapter 12's SmolLM2 runs: LoRA teaches SmolLM2-135M-Instruct to answer a sentiment instruction, over an fp32
base and over an NF4 base (QLoRA-style), trained once and cached.

The task is chapter 12's zero-shot prompt: an instruction, a Rotten Tomatoes review and the cue
``"Sentiment:"``; the answer is the next token, `` negative`` or `` positive``. Prompted as it is, the model
calls most reviews positive. Fine-tuning trains LoRA (r = 8, α = 16, on ``q_proj`` and ``v_proj`` of all 30
layers, :func:`lightlm.lora.add_lora`) with the language-model loss on the answer token only (cross-entropy
over the whole vocabulary at the answer slot): ``steps`` AdamW steps on batches of ``batch_size`` training
reviews (a seeded shuffle of the training split, each seen once). It is done twice from the same seed:

* ``fp32``: the base as the book uses it (SmolLM2's float weights);
* ``nf4``: every Linear of the 30 layers stored as NF4 with double quantization (blocks of 64,
  :func:`lightlm.qlora.quantize_nf4`; the tied embedding and output layer stay float), frozen, with the same
  fp32 LoRA on top, the recipe of QLoRA (Dettmers et al. 2023).

Both are scored before and after on ``n_heldout`` test reviews (``rotten_tomatoes()["test"].shuffle(seed=0)``,
the first ones) by comparing the two label words' log-probabilities (:func:`lightlm.prompting.
score_label_words`); the NF4 run also after merging LoRA into its NF4 weights, which re-quantizes them
(:func:`lightlm.lora.merge_lora`), with the rounding that costs (:func:`lightlm.qlora.merge_rounding`). The cache
keeps both adapters as PEFT folders (``lora-fp32/``, ``lora-nf4/``), the accuracies and predictions, the bytes
of each base and adapter, the training seconds and losses, and greedy answers before and after to two negative
and two positive held-out reviews (:func:`sample_indices`).
About three CPU minutes; ``python -m lightlm.zoo warm lora-lm`` builds it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import zoo
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool
from .._packages import versions

__all__ = ["SETTINGS", "INSTRUCTION", "LABEL_WORDS", "prompt_part", "heldout_reviews", "sample_indices",
           "lora_lm_path", "lora_lm_inputs", "score", "build_lora_lm", "load_lora_lm", "warm_lora_lm"]

INSTRUCTION = "Classify the sentiment of each movie review as positive or negative."
LABEL_WORDS = [" negative", " positive"]
SETTINGS = {"version": 2, "instruction": INSTRUCTION, "label_words": LABEL_WORDS, "r": 8, "alpha": 16,
            "targets": ["q_proj", "v_proj"], "lr": 1e-3, "steps": 40, "batch_size": 16, "seed": 0,
            "n_heldout": 400, "nf4_block": 64, "n_samples": 4, "sample_tokens": 5, "threads": 2}
_FOLDER, _RESULTS = "smollm2-lora-sentiment", "results.json"


def prompt_part(text: str) -> str:
    """The part of the prompt after the instruction: the review and the cue (a blank line first, so the
    tokens of instruction + part are those of the instruction followed by those of the part)."""
    return f"\n\nReview: {text}\nSentiment:"


def heldout_reviews(n: int | None = None) -> tuple[list[str], torch.Tensor]:
    """The first ``n`` (default ``n_heldout``) reviews of the seeded shuffle of the test split, and labels."""
    from .. import data

    test = data.rotten_tomatoes()["test"].shuffle(seed=0).select(range(n or SETTINGS["n_heldout"]))
    return list(test["text"]), torch.tensor(test["label"])


def sample_indices(labels: torch.Tensor) -> list[int]:
    """The held-out reviews whose greedy answers are kept: the first ``n_samples / 2`` negative and positive ones,
    in the order they come."""
    half = SETTINGS["n_samples"] // 2
    negative, positive = ((labels == k).nonzero().flatten()[:half].tolist() for k in (0, 1))
    return sorted(negative + positive)


def lora_lm_path() -> Path:
    """Folder of the cached results and adapters."""
    return zoo.cache_dir() / _FOLDER


def lora_lm_inputs() -> dict:
    """What the results are computed from: :data:`SETTINGS`, the model, the data and the library versions."""
    from .. import data
    from .._pins import FILES

    return {"settings": SETTINGS, "model": zoo.smollm2_inputs(), "rotten_tomatoes_sha256": FILES[data.RT_FILE],
            "packages": {"torch": torch.__version__, **versions("transformers", "peft")}}


@torch.no_grad()
def score(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Predicted labels (0 negative, 1 positive): the label word with the larger log-probability."""
    from ..prompting import score_label_words

    model.eval()
    return score_label_words(model, tokenizer, INSTRUCTION, [prompt_part(t) for t in texts], LABEL_WORDS).argmax(-1)


@torch.no_grad()
def _answers(model, tokenizer, texts: list[str]) -> list[str]:
    """Greedy continuations of the prompt: what the model writes after "Sentiment:"."""
    out = []
    for text in texts:
        ids = tokenizer(INSTRUCTION + prompt_part(text), return_tensors="pt")
        new = model.generate(**ids, max_new_tokens=SETTINGS["sample_tokens"], do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def _batches(tokenizer, texts: list[str], labels: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded prompts, their attention mask, and the label word's token id per prompt."""
    from ..train import pad

    s = SETTINGS
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(s["seed"])).tolist()
    batches = []
    for step in range(s["steps"]):
        rows = order[step * s["batch_size"]:(step + 1) * s["batch_size"]]
        ids = [torch.tensor(tokenizer(INSTRUCTION + prompt_part(texts[i]), add_special_tokens=False)["input_ids"])
               for i in rows]
        batches.append((*pad(ids, tokenizer.pad_token_id), torch.tensor([word_ids[labels[i]] for i in rows])))
    return batches


def _answer_loss(model, batch) -> torch.Tensor:
    """Cross-entropy of the label word at each prompt's answer slot (the output layer runs there only)."""
    ids, mask, targets = batch
    lengths = mask.sum(1)
    hidden = model.model(ids, attention_mask=mask).last_hidden_state
    last = hidden[torch.arange(len(lengths)), lengths - 1]
    return torch.nn.functional.cross_entropy(model.lm_head(last).float(), targets)


def _run(base: str, train_texts, train_labels, held, held_labels, staging: Path, progress: bool) -> dict:
    from ..cost import model_size_bytes
    from ..lora import add_lora, lora_layers, merge_lora
    from ..lora_io import adapter_nbytes, save_adapter
    from ..qlora import merge_rounding, quantize_nf4
    from ..train import seed_everything, train_loop

    s = SETTINGS
    tokenizer, model = zoo.load_smollm2(progress=progress)
    result = {"bytes_fp32": model_size_bytes(model)}
    if base == "nf4":
        quantize_nf4(model, block_size=s["nf4_block"], double_quant=True)
    result["bytes"] = model_size_bytes(model)
    samples = [held[i] for i in sample_indices(held_labels)]
    before = score(model, tokenizer, held)
    result.update(before=(before == held_labels).float().mean().item(), before_positive=before.float().mean().item(),
                  samples_before=_answers(model, tokenizer, samples), predictions_before=before.tolist())
    seed_everything(s["seed"])
    report = add_lora(model, s["targets"], r=s["r"], alpha=s["alpha"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"])
    started = time.perf_counter()
    losses = train_loop(model, _batches(tokenizer, train_texts, train_labels), _answer_loss, optimizer,
                        progress=progress, desc=f"SmolLM2 LoRA over {base}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    after = score(model, tokenizer, held)
    result.update(after=(after == held_labels).float().mean().item(), after_positive=after.float().mean().item(),
                  samples_after=_answers(model, tokenizer, samples), predictions_after=after.tolist(), losses=losses,
                  trainable=report["trainable"],
                  total=report["total"])
    folder = staging / f"lora-{base}"
    save_adapter(model, folder, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", task_type="CAUSAL_LM")
    result["adapter_bytes"] = adapter_nbytes(folder)
    if base == "nf4":  # merging re-quantizes: what does that rounding cost?
        errors = [merge_rounding(layer.base, layer.delta_weight())["relative_error"]
                  for layer in lora_layers(model).values()]
        result["merge_relative_error"] = sum(errors) / len(errors)
        merge_lora(model)
        merged = score(model, tokenizer, held)
        result["after_merge"] = (merged == held_labels).float().mean().item()
    return result


def _build(staging: Path, progress: bool) -> dict:
    from .. import data

    torch.set_num_threads(SETTINGS["threads"])
    train = data.rotten_tomatoes()["train"]
    held, held_labels = heldout_reviews()
    runs = {base: _run(base, list(train["text"]), list(train["label"]), held, held_labels, staging, progress)
            for base in ("fp32", "nf4")}
    (staging / _RESULTS).write_text(json.dumps(runs, indent=1))
    return {base: {"before": run["before"], "after": run["after"]} for base, run in runs.items()}


def build_lora_lm(progress: bool = True) -> Path:
    """Make sure the runs are cached (a few CPU minutes the first time); returns their folder."""
    check_bool("progress", progress)
    return ensure(_FOLDER, lora_lm_inputs(), lambda staging: _build(staging, progress))


def load_lora_lm(progress: bool = True) -> dict:
    """``{"fp32": run, "nf4": run, "settings": SETTINGS, "folder": path}``; a run holds ``before``/``after``
    (held-out accuracy), ``before_positive``/``after_positive`` (share called positive), ``samples_before``/
    ``samples_after``, ``losses``, ``seconds``, ``trainable``, ``total``, ``bytes`` (the base's weights),
    ``bytes_fp32``, ``adapter_bytes``, ``predictions_before``/``predictions_after`` (per held-out review);
    the NF4 run also ``merge_relative_error`` and ``after_merge``."""
    folder = build_lora_lm(progress)
    return {**json.loads((folder / _RESULTS).read_text()),
            "settings": read_manifest(folder)["inputs"]["settings"], "folder": folder}


def warm_lora_lm() -> str:
    """``python -m lightlm.zoo warm lora-lm``: build the runs unless they are already cached."""
    cached = inspect(lora_lm_path(), lora_lm_inputs()) is None
    runs = load_lora_lm(progress=True)
    return (f"{'cached' if cached else 'built'} at {lora_lm_path()}; held-out accuracy before/after LoRA "
            f"{runs['fp32']['before']:.3f}/{runs['fp32']['after']:.3f}, over NF4 {runs['nf4']['after']:.3f}")
