"""Prompting and fine-tuning plumbing for chapter 4, section "Fine-tuning versus prompting".

* :func:`score_label_words` — zero-/few-shot classification with a causal LM: the log-probability of each label
  word as the next token after ``prefix + part``, for many parts that share one prefix. The prefix runs once; its
  KV cache is copied for each batch of parts, so the examples of a few-shot prefix cost nothing per review.
* :func:`length_grouped_batches` — classification batches whose sentences have similar lengths (less padding),
  in a seeded random order.

Both take Hugging Face objects (a ``LlamaForCausalLM``-like model, a fast tokenizer) but import nothing from
transformers: they only call them.
"""

from __future__ import annotations

import copy

import torch

from ._checks import check_int, check_module

__all__ = ["score_label_words", "length_grouped_batches"]


def _check_texts(name: str, texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{name} must not be empty")
    if not all(isinstance(text, str) for text in texts):
        raise TypeError(f"{name} must contain only str")
    return list(texts)


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def score_label_words(model, tokenizer, prefix: str, parts, label_words, batch_size: int = 32) -> torch.Tensor:
    """``log p(label word | prefix + part)`` for every part and label word, as a ``(parts, labels)`` tensor.

    The parts are padded on the right, which is harmless under a causal mask (no position attends to the padding
    after it); the hidden state at each part's last real token goes through the output layer. For this to score
    the prompt you mean, the tokens of ``prefix + part`` must be those of ``prefix`` followed by those of
    ``part`` (check it: a tokenizer may merge across the seam), and each label word must be one token.

    Args:
        model: a Hugging Face causal LM with ``.model`` (the decoder) and ``.lm_head``, whose cache has
            ``batch_repeat_interleave`` (``DynamicCache``).
        tokenizer: its tokenizer (``pad_token_id`` is used for the padding).
        prefix: the shared start of every prompt (instruction, examples); parts: the rest, one per input.
        label_words: the candidate next tokens, e.g. ``[" negative", " positive"]``.
    """
    check_module("model", model)
    if not isinstance(prefix, str) or not prefix:
        raise TypeError(f"prefix must be a non-empty str, got {prefix!r:.40}")
    parts = _check_texts("parts", parts)
    label_words = _check_texts("label_words", label_words)
    batch_size = check_int("batch_size", batch_size, min=1)
    label_ids = [_token_ids(tokenizer, word) for word in label_words]
    if not all(len(ids) == 1 for ids in label_ids):
        raise ValueError(f"each label word must be one token; got {label_ids} for {label_words}")
    device = next(model.parameters()).device
    prefix_ids = torch.tensor([_token_ids(tokenizer, prefix)], device=device)  # (1, prefix length)
    prefix_cache = model(prefix_ids, use_cache=True).past_key_values
    part_ids = [_token_ids(tokenizer, part) for part in parts]
    if not all(part_ids):
        raise ValueError("every part must have at least one token")
    order = sorted(range(len(parts)), key=lambda i: len(part_ids[i]))  # batches of similar lengths
    scores = torch.empty(len(parts), len(label_ids), device=device)
    for first in range(0, len(parts), batch_size):
        rows = order[first:first + batch_size]
        lengths = torch.tensor([len(part_ids[i]) for i in rows], device=device)
        ids = torch.full((len(rows), int(lengths.max())), tokenizer.pad_token_id, device=device)
        for r, i in enumerate(rows):
            ids[r, : lengths[r]] = torch.tensor(part_ids[i], device=device)  # right padding
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(rows))  # one copy of the prefix per row
        hidden = model.model(ids, past_key_values=cache).last_hidden_state  # (rows, length, d)
        last = hidden[torch.arange(len(rows), device=device), lengths - 1]  # (rows, d): the answer slot
        log_probs = model.lm_head(last).float().log_softmax(-1)
        scores[rows] = log_probs[:, [ids[0] for ids in label_ids]]
    return scores


def length_grouped_batches(tokenizer, texts, labels: torch.Tensor, batch_size: int = 32, seed: int = 0,
                           max_length: int = 48) -> list:
    """Classification batches of sentences of similar token length, in a seeded random order.

    The texts are sorted by length and cut into consecutive groups of ``batch_size`` (the last may be smaller);
    the groups are shuffled with ``torch.Generator().manual_seed(seed)``. Every text appears in exactly one
    batch. Returns a list of ``(encoding, labels)`` pairs, each encoding padded to its batch's longest text.
    """
    texts = _check_texts("texts", texts)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != (len(texts),):
        raise ValueError(f"labels must have shape ({len(texts)},), one per text; got {tuple(labels.shape)}")
    batch_size = check_int("batch_size", batch_size, min=1)
    seed = check_int("seed", seed, min=0)
    max_length = check_int("max_length", max_length, min=1)
    lengths = [min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"]]
    by_length = sorted(range(len(texts)), key=lambda i: lengths[i])
    groups = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    shuffled = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))
    return [(tokenizer([texts[i] for i in groups[g]], padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"), labels[groups[g]]) for g in shuffled.tolist()]
