"""What "lightweight" measures, by arithmetic: parameters, bytes and FLOPs (chapter 1, "Measuring what
lightweight means"). Nothing here runs a model; timing and peak memory are in :mod:`lightlm.bench`
(``cost.benchmark``, ``cost.peak_memory`` and ``cost.Timing`` still resolve there, imported on first use).

Conventions: GB means 10^9 bytes (so a 7B-parameter model at fp16 holds 14 GB of weights); FLOPs count a
multiply and an add as two operations, as ``torch.utils.flop_counter`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_bool, check_int, check_module, check_real
from .lora import lora_param_count  # lives with LoRA now; kept here as cost.lora_param_count

__all__ = ["count_parameters", "parameter_report", "parameter_groups", "param_count_from_config",
           "lora_param_count", "BYTES_PER_PARAM", "bytes_per_param", "model_size_bytes", "weight_memory",
           "memory_table", "format_bytes", "matmul_params", "flops_per_token"]

_MOVED_TO_BENCH = ("Timing", "benchmark", "peak_memory")

# --------------------------------------------------------------------------- parameters


def count_parameters(model: nn.Module, trainable_only: bool = False, non_embedding: bool = False) -> int:
    """Number of parameters N of a module (chapter 1, eq. (n-params)).

    Shared (tied) tensors are counted once, as ``model.parameters()`` yields them once.

    Args:
        model: any ``torch.nn.Module``, e.g. a Hugging Face ``BertModel``.
        trainable_only: count only parameters with ``requires_grad``.
        non_embedding: leave out the weights of ``nn.Embedding`` modules (token, position and token-type
            tables), the convention of Kaplan et al. (2020); a tied output layer goes with its embedding.
    """
    check_module("model", model)
    check_bool("trainable_only", trainable_only)
    check_bool("non_embedding", non_embedding)
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
    check_module("model", model)
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


def _optional(config: Any, name: str) -> Any:
    """A config field that may be missing (None then)."""
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def param_count_from_config(config: Any) -> int:
    """Parameters of a Hugging Face base model computed from its configuration alone (chapter 1).

    Supported ``model_type``: ``bert`` (``BertModel`` with its pooler), ``albert`` (``AlbertModel`` with its
    pooler: V×E embedding tables, an E×H projection, ``num_hidden_groups × inner_group_num`` stored layers however
    deep the model runs), ``distilbert`` (``DistilBertModel``), ``gpt2`` (``GPT2Model``; the LM head is tied to
    the token embedding) and ``llama`` (``LlamaForCausalLM``, with a separate LM head unless
    ``tie_word_embeddings``, and the biases that ``attention_bias`` and ``mlp_bias`` add). Reproduces the
    published counts: BERT-base 109,482,240; ALBERT-base 11,683,584; DistilBERT 66,362,880; GPT-2 small
    124,439,808; SmolLM2-135M 134,515,008.

    Args:
        config: a ``transformers`` config object or a dict with the same fields.
    """
    if not isinstance(config, dict) and not hasattr(config, "model_type"):
        raise TypeError(f"config must be a transformers config or a dict, got {type(config).__name__}")
    kind = _get(config, "model_type")
    if kind in ("bert", "albert", "distilbert"):  # post-norm encoders; ALBERT: E-wide tables, E×H, shared groups
        bert = kind != "distilbert"  # DistilBERT: no token types, no pooler
        d, layers, ffn = (_get(config, *names) for names in (("hidden_size", "dim"), ("num_hidden_layers", "n_layers"),
                                                             ("intermediate_size", "hidden_dim")))
        e = _get(config, "embedding_size") if kind == "albert" else d
        tables = _get(config, "vocab_size") + _get(config, "max_position_embeddings")
        tables += _get(config, "type_vocab_size") if bert else 0
        embeddings = tables * e + 2 * e + ((e * d + d) if kind == "albert" else 0)  # tables, LayerNorm, (E×H)
        if kind == "albert":  # layer i runs group ⌊i·groups/layers⌋: only groups × inner layers are stored
            layers = (_optional(config, "num_hidden_groups") or 1) * (_optional(config, "inner_group_num") or 1)
        layer = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d  # attention, LN, FFN, LN
        return embeddings + layers * layer + ((d * d + d) if bert else 0)  # + pooler
    if kind == "gpt2":
        d, layers = _get(config, "n_embd"), _get(config, "n_layer")
        ffn = _optional(config, "n_inner") or 4 * d
        embeddings = (_get(config, "vocab_size") + _get(config, "n_positions")) * d
        layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d)
        return embeddings + layers * layer + 2 * d  # + final LayerNorm
    if kind == "llama":
        d, layers, ffn = (_get(config, name) for name in ("hidden_size", "num_hidden_layers", "intermediate_size"))
        heads = _get(config, "num_attention_heads")
        kv_heads = _get(config, "num_key_value_heads", "num_attention_heads")
        head_dim = _optional(config, "head_dim") or d // heads
        vocab = _get(config, "vocab_size")
        attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o and k, v (grouped-query)
        if _optional(config, "attention_bias"):
            attention += heads * head_dim + 2 * kv_heads * head_dim + d  # q, k, v and o biases
        mlp = 3 * d * ffn + ((2 * ffn + d) if _optional(config, "mlp_bias") else 0)  # gate/up/down (+ biases)
        layer = attention + mlp + 2 * d  # two RMSNorms
        tied = _optional(config, "tie_word_embeddings")
        return vocab * d + layers * layer + d + (0 if tied else vocab * d)
    raise ValueError(f"model_type {kind!r} is not supported; supported: bert, distilbert, gpt2, llama, albert")


# --------------------------------------------------------------------------- bytes and memory

BYTES_PER_PARAM: dict[str, float] = {
    "fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "fp4": 0.5, "int4": 0.5,
    "nf4": 0.5,
}
_ALIASES = {
    "double": "fp64", "float": "fp32", "half": "fp16", "qint8": "int8", "quint8": "int8", "nvfp4": "fp4",
    "mxfp4": "fp4",
}
# torch dtypes narrower than a byte: their bits / 8. torch stores uint1..7 and int1..7 one per byte (it
# does not pack them), yet the format is N bits; float4_e2m1fn_x2 and quint4x2 hold two 4-bit values
# per element, quint2x4 four 2-bit values. Looked up by name: older torch builds lack some of them.
_SUB_BYTE = {f"{sign}int{bits}": bits / 8 for sign in ("u", "") for bits in range(1, 8)}
_SUB_BYTE.update({"float4_e2m1fn_x2": 0.5, "quint4x2": 0.5, "quint2x4": 0.25})


def bytes_per_param(dtype: torch.dtype | str) -> float:
    """Bytes that one parameter takes in a format: its bits / 8 (4 for fp32, 2 for fp16, 0.5 for int4).

    Accepts a ``torch.dtype`` or a name: ``"fp16"``, ``"bf16"``, ``"int4"``, ``"nf4"`` ... or any torch dtype
    name (``"bfloat16"``, ``"torch.uint4"``). Sub-byte formats count their bits: ``torch.uint4``, ``"int4"``
    and ``"uint4"`` are all 0.5, ``torch.int2`` 0.25, and a packed ``torch.float4_e2m1fn_x2`` element holds
    two parameters, 0.5 byte each. Quantized formats also store scales (and zero-points); that overhead is
    not included here (see the quantization chapter).
    """
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        name = _ALIASES.get(name, name)
        if name in BYTES_PER_PARAM:
            return BYTES_PER_PARAM[name]
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(BYTES_PER_PARAM)} and torch dtype names")
        dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a name such as 'fp16', got {type(dtype).__name__}")
    if dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"{dtype} is not a parameter dtype (complex and bool are not)")
    name = str(dtype).removeprefix("torch.")
    return _SUB_BYTE[name] if name in _SUB_BYTE else dtype.itemsize


def model_size_bytes(model: nn.Module, include_buffers: bool = True) -> int:
    """Bytes held by a module's parameters (and buffers), each at its own dtype; shared tensors once.

    Counts what torch allocates, ``numel × element_size`` per tensor (so a ``torch.uint4`` tensor, which
    torch keeps one value per byte, counts 1 byte per value here and 0.5 in :func:`bytes_per_param`). Works
    on the meta device, where models are sized without memory: tensors that share memory are recognised by
    their address, and meta tensors, which have none, by identity.
    """
    check_module("model", model)
    check_bool("include_buffers", include_buffers)
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    seen, total = set(), 0
    for tensor in tensors:
        address = tensor.data_ptr() if tensor.device.type != "meta" else 0
        key = (str(tensor.device), address) if address else ("id", id(tensor))  # no address: meta, empty
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def weight_memory(n_params: float, dtype: torch.dtype | str) -> float:
    """Bytes needed to hold ``n_params`` weights at ``dtype``: N × bytes per parameter."""
    n_params = check_real("n_params", n_params, min=0)
    return n_params * bytes_per_param(dtype)


def memory_table(
    sizes: dict[str, float] | None = None, dtypes: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
) -> dict[str, dict[str, float]]:
    """GB (10^9 bytes) of weights for each model size and dtype: ``{size_name: {dtype: GB}}``.

    Args:
        sizes: ``{name: number of parameters}``; default 1B, 7B and 70B.
        dtypes: a tuple or list of dtype names or torch dtypes (see :func:`bytes_per_param`).
    """
    sizes = sizes if sizes is not None else {"1B": 1e9, "7B": 7e9, "70B": 70e9}
    if not isinstance(sizes, dict):
        raise TypeError(f"sizes must be a dict {{name: number of parameters}}, got {type(sizes).__name__}")
    if not isinstance(dtypes, (tuple, list)):
        raise TypeError(f"dtypes must be a tuple or list of dtype names, e.g. ('fp16',), got {type(dtypes).__name__}")
    return {name: {dtype: weight_memory(n, dtype) / 1e9 for dtype in dtypes} for name, n in sizes.items()}


def format_bytes(n_bytes: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units); n_bytes a finite number >= 0."""
    n_bytes = check_real("n_bytes", n_bytes, min=0)
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
    check_module("model", model)
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
    for name, value in (("n_matmul_params", n_matmul_params), ("n_layers", n_layers), ("context", context),
                        ("d_attn", d_attn)):
        check_int(name, value, min=0)
    return 2 * n_matmul_params + 4 * n_layers * context * d_attn


def __getattr__(name: str) -> Any:
    """``cost.benchmark``, ``cost.peak_memory``, ``cost.Timing``: moved to :mod:`lightlm.bench`, found there."""
    if name in _MOVED_TO_BENCH:
        from . import bench

        return getattr(bench, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
