"""What "lightweight" measures: parameters, bytes, FLOPs and latency (chapter 1, "Measuring what lightweight
means").

Conventions: GB means 10^9 bytes (so a 7B-parameter model at fp16 holds 14 GB of weights); FLOPs count a
multiply and an add as two operations, as ``torch.utils.flop_counter`` does.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

# --------------------------------------------------------------------------- parameters


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")


def count_parameters(model: nn.Module, trainable_only: bool = False, non_embedding: bool = False) -> int:
    """Number of parameters N of a module (chapter 1, eq. (n-params)).

    Shared (tied) tensors are counted once, as ``model.parameters()`` yields them once.

    Args:
        model: any ``torch.nn.Module``, e.g. a Hugging Face ``BertModel``.
        trainable_only: count only parameters with ``requires_grad``.
        non_embedding: leave out the weights of ``nn.Embedding`` modules (token, position and token-type
            tables), the convention of Kaplan et al. (2020); a tied output layer goes with its embedding.
    """
    _check_module(model)
    skip: set[int] = set()
    if non_embedding:
        skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(
        p.numel() for p in model.parameters() if id(p) not in skip and (p.requires_grad or not trainable_only)
    )


def parameter_report(model: nn.Module) -> dict[str, int]:
    """``{"total", "trainable", "non_embedding"}`` parameter counts of a module."""
    return {
        "total": count_parameters(model),
        "trainable": count_parameters(model, trainable_only=True),
        "non_embedding": count_parameters(model, non_embedding=True),
    }


def parameter_groups(model: nn.Module) -> dict[str, int]:
    """Where a Transformer's parameters sit: ``embeddings``, ``attention``, ``mlp``, ``norms``, ``other``.

    Grouped by the module that owns each tensor: ``nn.Embedding`` -> embeddings; a normalisation layer (class
    name containing "Norm") -> norms; a module whose qualified name contains "attention" or "attn" ->
    attention; any other Linear/Conv1D inside a layer ("layer"/"layers"/"h"/"block" in the name) -> mlp;
    the rest (poolers, untied heads) -> other. Shared tensors are counted once, with their first owner.
    """
    _check_module(model)
    groups = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "other"), 0)
    seen: set[int] = set()
    for name, module in model.named_modules():
        for tensor in module.parameters(recurse=False):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            parts = set(name.lower().split("."))
            if isinstance(module, nn.Embedding):
                group = "embeddings"
            elif "norm" in type(module).__name__.lower():
                group = "norms"
            elif "attention" in name.lower() or "attn" in name.lower():
                group = "attention"
            elif parts & {"layer", "layers", "h", "block", "blocks"}:
                group = "mlp"
            else:
                group = "other"
            groups[group] += tensor.numel()
    return groups


def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"config has none of the fields {names}")


def param_count_from_config(config: Any) -> int:
    """Parameters of a Hugging Face base model computed from its configuration alone (chapter 1).

    Supported ``model_type``: ``bert`` (``BertModel`` with its pooler), ``distilbert`` (``DistilBertModel``),
    ``gpt2`` (``GPT2Model``; the LM head is tied to the token embedding) and ``llama``
    (``LlamaForCausalLM``, with a separate LM head unless ``tie_word_embeddings``). Reproduces the published
    counts: BERT-base 109,482,240; DistilBERT 66,362,880; GPT-2 small 124,439,808.

    Args:
        config: a ``transformers`` config object or a dict with the same fields.
    """
    kind = _get(config, "model_type")
    if kind == "bert":
        d, layers, ffn = _get(config, "hidden_size"), _get(config, "num_hidden_layers"), _get(config, "intermediate_size")
        embeddings = (_get(config, "vocab_size") + _get(config, "max_position_embeddings") + _get(config, "type_vocab_size")) * d + 2 * d
        layer = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d  # attention, LN, FFN, LN
        return embeddings + layers * layer + (d * d + d)  # + pooler
    if kind == "distilbert":
        d, layers, ffn = _get(config, "dim"), _get(config, "n_layers"), _get(config, "hidden_dim")
        embeddings = (_get(config, "vocab_size") + _get(config, "max_position_embeddings")) * d + 2 * d
        layer = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d
        return embeddings + layers * layer
    if kind == "gpt2":
        d, layers = _get(config, "n_embd"), _get(config, "n_layer")
        ffn = getattr(config, "n_inner", None) if not isinstance(config, dict) else config.get("n_inner")
        ffn = ffn or 4 * d
        embeddings = (_get(config, "vocab_size") + _get(config, "n_positions")) * d
        layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d)
        return embeddings + layers * layer + 2 * d  # + final LayerNorm
    if kind == "llama":
        d, layers, ffn = _get(config, "hidden_size"), _get(config, "num_hidden_layers"), _get(config, "intermediate_size")
        heads = _get(config, "num_attention_heads")
        kv_heads = _get(config, "num_key_value_heads", "num_attention_heads")
        head_dim = (config.get("head_dim") if isinstance(config, dict) else getattr(config, "head_dim", None)) or d // heads
        vocab = _get(config, "vocab_size")
        attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o and k, v (grouped-query)
        layer = attention + 3 * d * ffn + 2 * d  # gate/up/down MLP, two RMSNorms
        tied = config.get("tie_word_embeddings", False) if isinstance(config, dict) else getattr(config, "tie_word_embeddings", False)
        return vocab * d + layers * layer + d + (0 if tied else vocab * d)
    raise ValueError(f"model_type {kind!r} is not supported; supported: bert, distilbert, gpt2, llama")


def lora_param_count(d_in: int, d_out: int, r: int, n_matrices: int = 1) -> int:
    """Trainable parameters LoRA adds: ``n_matrices · r · (d_in + d_out)`` (A is r×d_in, B is d_out×r)."""
    for name, value in (("d_in", d_in), ("d_out", d_out), ("r", r), ("n_matrices", n_matrices)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if r > min(d_in, d_out):
        raise ValueError(f"rank r={r} exceeds min(d_in, d_out)={min(d_in, d_out)}: the update would not be low-rank")
    return n_matrices * r * (d_in + d_out)


# --------------------------------------------------------------------------- bytes and memory

BYTES_PER_PARAM: dict[str, float] = {
    "fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5, "nf4": 0.5,
}
_ALIASES = {
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
    "bfloat16": "bf16", "uint8": "int8", "qint8": "int8", "quint8": "int8", "uint4": "int4",
}


def bytes_per_param(dtype: torch.dtype | str) -> float:
    """Bytes that one parameter takes: 4 for fp32, 2 for fp16/bf16, 1 for int8, 0.5 for int4/nf4.

    Accepts a ``torch.dtype`` or a name such as ``"fp16"``, ``"bfloat16"``, ``"int4"``. Quantized formats
    also store scales (and zero-points); that overhead is not included here (see the quantization chapter).
    """
    if isinstance(dtype, torch.dtype):
        if dtype.is_complex or dtype == torch.bool:
            raise ValueError(f"{dtype} is not a parameter dtype")
        return torch.empty((), dtype=dtype).element_size()
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")
    key = _ALIASES.get(dtype.lower().removeprefix("torch."), dtype.lower())
    if key not in BYTES_PER_PARAM:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(BYTES_PER_PARAM)} and torch dtypes")
    return BYTES_PER_PARAM[key]


def model_size_bytes(model: nn.Module, include_buffers: bool = True) -> int:
    """Bytes held by a module's parameters (and buffers), each at its own dtype; shared tensors once."""
    _check_module(model)
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    seen, total = set(), 0
    for tensor in tensors:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def weight_memory(n_params: float, dtype: torch.dtype | str) -> float:
    """Bytes needed to hold ``n_params`` weights at ``dtype``: N × bytes per parameter."""
    if not isinstance(n_params, (int, float)) or isinstance(n_params, bool):
        raise TypeError(f"n_params must be a number, got {type(n_params).__name__}")
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")
    return n_params * bytes_per_param(dtype)


def memory_table(
    sizes: dict[str, float] | None = None, dtypes: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
) -> dict[str, dict[str, float]]:
    """GB (10^9 bytes) of weights for each model size and dtype: ``{size_name: {dtype: GB}}``."""
    sizes = sizes if sizes is not None else {"1B": 1e9, "7B": 7e9, "70B": 70e9}
    return {name: {dtype: weight_memory(n, dtype) / 1e9 for dtype in dtypes} for name, n in sizes.items()}


def format_bytes(n_bytes: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units)."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.2f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- FLOPs


def matmul_params(model: nn.Module) -> int:
    """Weights that take part in matrix products: those of ``nn.Linear`` and Hugging Face ``Conv1D``.

    Embedding lookups cost no multiply-adds, so they are not included; a tied LM head is (it is a Linear).
    """
    _check_module(model)
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                total += module.weight.numel()
    return total


def flops_per_token(n_matmul_params: int, n_layers: int = 0, context: int = 0, d_attn: int = 0) -> int:
    """Forward FLOPs per token: ``2·N + 4·n_layers·context·d_attn`` (chapter 1, eq. (flops)).

    ``2·N``: every weight in a matrix product does one multiply and one add per token. The second term is
    attention itself, which has no weights: ``Q Kᵀ`` and ``A V`` each cost ``2·context·d_attn`` per token and
    layer when every query sees ``context`` keys (as dense kernels compute it, masked or not). Kaplan et al.
    (2020) quote ``2N + 2·n_layers·n_ctx·d_attn``, counting the score product only.
    """
    for name, value in (("n_matmul_params", n_matmul_params), ("n_layers", n_layers), ("context", context), ("d_attn", d_attn)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return 2 * n_matmul_params + 4 * n_layers * context * d_attn


# --------------------------------------------------------------------------- peak memory


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side logs "profiler_start/stop" lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``: the largest amount of CPU tensor memory that was
    live at once during the call, beyond what was allocated before it.

    Measured with ``torch.profiler`` (``profile_memory=True``), which records the allocations and frees of
    torch's CPU allocator op by op; the peak is the maximum of their running sum. A buffer that an operator
    allocates and frees inside itself nets to zero at this granularity.
    """
    if not callable(fn):
        raise TypeError("fn must be a callable taking no arguments")
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # An op reports the memory it and its children allocated, so each op contributes its *self* memory
    # (its total minus its children's); a free outside any op appears as a "[memory]" event.
    events = [e for e in prof.events() if e.self_cpu_memory_usage]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage  # positive for an allocation, negative for a free
        peak = max(peak, live)
    return result, peak


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Result of :func:`benchmark`. ``ratio`` = baseline median / median (a speed-up when > 1)."""

    median: float
    times: list[float] = field(repr=False)
    baseline_median: float | None = None
    baseline_times: list[float] | None = field(default=None, repr=False)

    @property
    def ratio(self) -> float | None:
        return None if self.baseline_median is None else self.baseline_median / self.median

    def __str__(self) -> str:
        text = f"median {self.median * 1e3:.2f} ms over {len(self.times)} runs"
        if self.ratio is not None:
            text += f"; baseline {self.baseline_median * 1e3:.2f} ms; ratio {self.ratio:.2f}x"
        return text


def benchmark(
    fn: Callable[[], Any], *, baseline: Callable[[], Any] | None = None, warmup: int = 2, repeat: int = 7
) -> Timing:
    """Time a zero-argument callable: ``warmup`` untimed calls, then the median of ``repeat`` timed calls.

    With ``baseline``, both are timed in alternating order in the same loop, so a slow moment of a shared
    machine hits both alike, and ``Timing.ratio`` gives baseline / fn. Wrap calls in ``torch.inference_mode``
    yourself when timing inference.
    """
    if not callable(fn) or (baseline is not None and not callable(baseline)):
        raise TypeError("fn and baseline must be callables taking no arguments")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    callables = [fn] if baseline is None else [fn, baseline]
    for _ in range(warmup):
        for call in callables:
            call()
    times: list[list[float]] = [[] for _ in callables]
    for round_ in range(repeat):
        order = range(len(callables)) if round_ % 2 == 0 else reversed(range(len(callables)))
        for index in order:
            start = time.perf_counter()
            callables[index]()
            times[index].append(time.perf_counter() - start)
    if baseline is None:
        return Timing(statistics.median(times[0]), times[0])
    return Timing(statistics.median(times[0]), times[0], statistics.median(times[1]), times[1])
