"""Tokens per second, greedy tokens and perplexity of a causal LM, for a PyTorch model or an export (chapter 14).

Each function takes a Hugging Face causal LM (a ``torch.nn.Module`` called with ``input_ids``,
``past_key_values`` and ``use_cache``) or an :class:`lightlm.deploy_llm.ExportedLLM`, and measures both the
same way: batch 1, greedy decoding with the KV cache, ``warmup`` untimed runs, then the median of ``repeats``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ._checks import check_int, check_tensor
from .deploy_llm import ExportedLLM, _device, _genai

__all__ = ["Speed", "decode_speed", "prefill_speed", "greedy", "score", "perplexity", "linear_bytes"]


@dataclass(frozen=True)
class Speed:
    """``tokens_per_s``: tokens divided by the median of the timed runs' ``seconds`` (``tokens`` each)."""
    tokens_per_s: float
    seconds: tuple[float, ...]
    tokens: int


def _prompt(prompt_ids: Any) -> torch.Tensor:
    check_tensor("prompt_ids", prompt_ids, kind="int", ndim=2)
    if prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be one non-empty prompt of shape (1, length), got {tuple(prompt_ids.shape)}")
    return prompt_ids


def _check_model(model: Any) -> None:
    if not isinstance(model, (torch.nn.Module, ExportedLLM)):
        raise TypeError(f"model must be a Hugging Face causal LM (torch.nn.Module) or an ExportedLLM, got "
                        f"{type(model).__name__}")


def _genai_generator(model: ExportedLLM, length: int):
    og = _genai()
    params = og.GeneratorParams(model.genai_model())
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    return og.Generator(model.genai_model(), params)


def _end_of_text(model: torch.nn.Module) -> list[int]:
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    ids = getattr(config, "eos_token_id", None)
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


@torch.no_grad()
def _run(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """One greedy run: (prefill seconds, seconds of the ``new_tokens`` decode steps, the tokens generated). End of
    text is never chosen, so every run makes exactly ``new_tokens`` tokens (ONNX Runtime GenAI with ``min_length``
    suppresses it the same way, as does transformers' ``generate`` with ``min_new_tokens``)."""
    if isinstance(model, ExportedLLM):
        generator = _genai_generator(model, prompt.shape[1] + new_tokens)
        start = time.perf_counter()
        generator.append_tokens(prompt.cpu().to(torch.int32).numpy())
        prefilled = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        decoded = time.perf_counter() - prefilled
        return prefilled - start, decoded, [int(t) for t in generator.get_sequence(0)[prompt.shape[1]:]]
    prompt, banned = prompt.to(_device(model)), _end_of_text(model)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, -1:].clone()
        logits[..., banned] = float("-inf")
        return logits.argmax(-1)

    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    token, tokens = choose(out.logits), []
    prefilled = time.perf_counter()
    for _ in range(new_tokens):
        tokens.append(int(token))
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = choose(out.logits)
    return prefilled - start, time.perf_counter() - prefilled, tokens


def _timed(model, prompt_ids, new_tokens: int, repeats: int, warmup: int, which: int, tokens: int) -> Speed:
    _check_model(model)
    prompt = _prompt(prompt_ids)
    new_tokens, repeats = check_int("new_tokens", new_tokens, min=1), check_int("repeats", repeats, min=1)
    runs = [_run(model, prompt, new_tokens)[which] for _ in range(check_int("warmup", warmup, min=0) + repeats)]
    seconds = tuple(runs[warmup:])
    return Speed(tokens / statistics.median(seconds), seconds, tokens)


def decode_speed(model, prompt_ids: torch.Tensor, *, new_tokens: int = 16, repeats: int = 3,
                 warmup: int = 1) -> Speed:
    """Greedy decoding speed at batch 1: after the prompt, ``new_tokens`` steps of one token each (with the KV
    cache), timed together; ``warmup`` untimed runs first, then the median of ``repeats``. ``model`` is a
    Hugging Face causal LM or an :class:`ExportedLLM`."""
    return _timed(model, prompt_ids, new_tokens, repeats, warmup, 1, new_tokens)


def prefill_speed(model, prompt_ids: torch.Tensor, *, repeats: int = 3, warmup: int = 1) -> Speed:
    """Prompt-processing speed at batch 1: prompt tokens per second of the forward pass that reads the whole
    prompt and fills the KV cache (the time to the first token); medians as :func:`decode_speed`."""
    return _timed(model, prompt_ids, 1, repeats, warmup, 0, _prompt(prompt_ids).shape[1])


def greedy(model, prompt_ids: torch.Tensor, new_tokens: int = 32) -> list[int]:
    """The ``new_tokens`` tokens greedy decoding appends to the prompt (end of text is never chosen, as with
    ``generate(..., min_new_tokens=new_tokens)``)."""
    _check_model(model)
    return _run(model, _prompt(prompt_ids), check_int("new_tokens", new_tokens, min=1))[2]


@torch.no_grad()
def score(model, windows: torch.Tensor, batch_size: int = 16) -> dict:
    """Score next-token prediction over ``windows`` (n, seq) from the model's own logits (a Hugging Face causal
    LM's, or an :class:`ExportedLLM`'s: ONNX Runtime's): ``{"perplexity": exp(mean negative log-likelihood of
    every next token), "argmax": (n, seq − 1) the top-1 prediction at each position}``."""
    _check_model(model)
    check_tensor("windows", windows, kind="int", ndim=2)
    if windows.shape[1] < 2:
        raise ValueError(f"windows must have at least 2 tokens each, got shape {tuple(windows.shape)}")
    batch_size, total, count, argmax = check_int("batch_size", batch_size, min=1), 0.0, 0, []
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size].long()
        if isinstance(model, ExportedLLM):
            logits = model.logits(batch)
        else:
            batch = batch.to(_device(model))
            logits = model(input_ids=batch).logits
        log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -log_p.gather(-1, batch[:, 1:, None])[..., 0]
        total, count = total + nll.sum().item(), count + nll.numel()
        argmax.append(log_p.argmax(-1).cpu())
    return {"perplexity": float(torch.tensor(total / count, dtype=torch.float64).exp()), "argmax": torch.cat(argmax)}


def perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood of every next token) over ``windows`` (n, seq); see :func:`score`."""
    return score(model, windows, batch_size)["perplexity"]


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of every ``nn.Linear``'s weight and bias as stored — what one decoding step reads, the embedding
    lookup's single row aside. A tensor subclass (torchao's quantized weights) counts the tensors it holds."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def nbytes(tensor: torch.Tensor) -> int:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
            return sum(nbytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
        return tensor.numel() * tensor.element_size()

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for tensor in (module.weight, module.bias):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += nbytes(tensor)
    return total
