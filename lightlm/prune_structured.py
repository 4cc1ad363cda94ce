"""Structured pruning (结构化剪枝) of real Hugging Face models, chapter 9: attention heads, FFN neurons and whole
layers, removed by slicing the weights, so the result is a smaller DENSE model (faster and smaller with no sparse
kernels), unlike the masks of :mod:`lightlm.prune`.

transformers 5 has no ``prune_heads`` and no head mask: a head is removed by dropping its rows of the query, key
and value projections and its columns of the output projection. Supported layouts: BERT-style encoders
(``BertModel``, ``BertForSequenceClassification``, MiniLM: ``attention.self.query/key/value``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and Llama-style decoders (``LlamaModel``,
``LlamaForCausalLM``, SmolLM2: ``self_attn.q/k/v/o_proj``, ``mlp.gate/up/down_proj``). With grouped-query
attention query head h reads key/value head h // G (G query heads per group); every key/value group must keep
the same number of query heads, and a group that loses all of them loses its key/value head too.

All functions work in place and return the model. The config follows: ``num_hidden_layers`` always;
``intermediate_size`` when every layer keeps the same width (else ``layer_intermediate_sizes``, a per-layer
list); for Llama ``num_attention_heads``/``num_key_value_heads`` when every layer keeps the same heads (then
``from_config`` builds the same shapes); and ``pruned_heads`` = {layer: original head indices removed}, the field
transformers 4 used (transformers 5 ignores it, and BERT's config cannot express fewer heads of the same width).
Layer and head indices are those of the model as it is now (after earlier pruning).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ._checks import check_int, check_module

__all__ = ["transformer_layers", "head_scores", "neuron_scores", "lowest", "prune_heads", "prune_neurons",
           "drop_layers"]


def transformer_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The model's list of Transformer layers and its layout, ``"bert"`` or ``"llama"``."""
    check_module("model", model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module):
            first = module[0]
            if hasattr(first, "attention") and hasattr(getattr(first.attention, "self", None), "query"):
                return module, "bert"
            if hasattr(getattr(first, "self_attn", None), "q_proj") and hasattr(first, "mlp"):
                return module, "llama"
    raise TypeError(f"{type(model).__name__} has no BERT-style (attention.self.query) or Llama-style "
                    "(self_attn.q_proj) layer list; structured pruning supports those two layouts")


def _attention(layer: nn.Module, arch: str):
    """(attention module holding the head counts, q, k, v, o, head width)."""
    if arch == "bert":
        a = layer.attention.self
        return a, a.query, a.key, a.value, layer.attention.output.dense, a.attention_head_size
    a = layer.self_attn
    return a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.head_dim


def _ffn(layer: nn.Module, arch: str) -> tuple[list[nn.Linear], nn.Linear]:
    """(Linears whose output rows are the neurons, the Linear whose input columns are)."""
    if arch == "bert":
        return [layer.intermediate.dense], layer.output.dense
    return [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj


@torch.no_grad()
def _slice(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (outputs) or ``cols`` (inputs) of a Linear, in place."""
    weight = linear.weight
    if rows is not None:
        linear.weight = nn.Parameter(weight[rows.to(weight.device)].clone(), requires_grad=weight.requires_grad)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[rows.to(weight.device)].clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = len(rows)
    if cols is not None:
        linear.weight = nn.Parameter(weight[:, cols.to(weight.device)].clone(), requires_grad=weight.requires_grad)
        linear.in_features = len(cols)


def _indices(what: str, where: str, given, size: int) -> list[int]:
    """Sorted distinct indices in range(size), not all of them."""
    if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
        raise TypeError(f"the {what} indices of {where} must be an iterable of ints, got {type(given).__name__}")
    found = sorted({check_int(f"{what} index", i) for i in given})
    for i in found:
        if not 0 <= i < size:
            raise ValueError(f"{what} index {i} is out of range for {where}, which has {size} {what}s "
                             f"(0..{size - 1})")
    if len(found) == size:
        raise ValueError(f"removing all {size} {what}s of {where} leaves nothing"
                         + ("; drop the layer instead" if what != "layer" else ""))
    return found


def _per_layer(name: str, spec, layers: nn.ModuleList) -> dict[int, list]:
    if not isinstance(spec, Mapping):
        raise TypeError(f"{name} must be a mapping {{layer index: [indices]}}, got {type(spec).__name__}")
    for layer in spec:
        if not 0 <= check_int("layer index", layer) < len(layers):
            raise ValueError(f"layer index {layer} is out of range: the model has {len(layers)} layers "
                             f"(0..{len(layers) - 1})")
    return {int(k): v for k, v in spec.items()}


def _heads(index: Iterable[int], width: int) -> torch.Tensor:
    """Row/column indices of heads ``index`` of width ``width``."""
    return torch.tensor([h * width + j for h in index for j in range(width)], dtype=torch.long)


def _sync_config(model: nn.Module, layers: nn.ModuleList, arch: str) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    config.num_hidden_layers = len(layers)
    widths = [_ffn(layer, arch)[1].in_features for layer in layers]
    if len(set(widths)) == 1:
        config.intermediate_size = widths[0]
        if hasattr(config, "layer_intermediate_sizes"):
            del config.layer_intermediate_sizes
    else:
        config.layer_intermediate_sizes = widths
    attention = [_attention(layer, arch)[0] for layer in layers]
    config.pruned_heads = {i: sorted(set(range(a.lightlm_original_heads)) - set(a.lightlm_heads))
                           for i, a in enumerate(attention) if hasattr(a, "lightlm_heads")}
    if arch == "llama":
        counts = {(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim) for a in attention}
        if len(counts) == 1:
            config.head_dim = attention[0].head_dim
            config.num_attention_heads, config.num_key_value_heads = counts.pop()


@torch.no_grad()
def head_scores(model: nn.Module) -> dict[int, torch.Tensor]:
    """Weight-norm importance of every query head, ``{layer: (heads,)}``: ‖W_V^(h)‖_F · ‖W_O^(h)‖_F, the norms of
    the value rows the head reads (its key/value head's, with grouped-query attention) and of the output
    projection's columns it writes. A head whose product is small can move the residual stream only a little
    (a cheap, data-free proxy; chapter 9 compares it with a data-driven one)."""
    layers, arch = transformer_layers(model)
    scores = {}
    for index, layer in enumerate(layers):
        _, q, k, v, o, width = _attention(layer, arch)
        n_heads, n_kv = q.out_features // width, k.out_features // width
        value = v.weight.reshape(n_kv, width, -1).float().norm(dim=(1, 2))  # one norm per key/value head
        out = o.weight.reshape(o.out_features, n_heads, width).float().norm(dim=(0, 2))
        scores[index] = value.repeat_interleave(n_heads // n_kv) * out
    return scores


@torch.no_grad()
def neuron_scores(model: nn.Module) -> dict[int, torch.Tensor]:
    """Weight-norm importance of every FFN neuron, ``{layer: (neurons,)}``: the product of the norms of its rows
    in the up (and gate) projections and of its column in the down projection."""
    layers, arch = transformer_layers(model)
    scores = {}
    for index, layer in enumerate(layers):
        ups, down = _ffn(layer, arch)
        score = down.weight.float().norm(dim=0)
        for up in ups:
            score = score * up.weight.float().norm(dim=1)
        scores[index] = score
    return scores


def lowest(scores: Mapping[int, torch.Tensor], keep: int) -> dict[int, list[int]]:
    """``{layer: indices}`` of every unit but the ``keep`` highest-scoring ones in each layer (equal scores: the
    lower index is kept), the argument :func:`prune_heads` and :func:`prune_neurons` take."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping {{layer: scores}}, got {type(scores).__name__}")
    check_int("keep", keep, min=1)
    plan = {}
    for layer, score in scores.items():
        if not isinstance(score, torch.Tensor) or score.ndim != 1:
            raise TypeError(f"the scores of layer {layer} must be a 1-D tensor, got {type(score).__name__}")
        if keep > len(score):
            raise ValueError(f"keep={keep} is more than layer {layer}'s {len(score)} units")
        order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
        plan[layer] = sorted(order[keep:])
    return plan


def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove attention heads, ``{layer: [head indices]}``, by slicing q/k/v rows and the output projection's
    columns; the model then computes exactly what the original computes with those heads' outputs zeroed.

    For grouped-query attention (Llama, SmolLM2: 9 query heads on 3 key/value heads) the query heads kept in
    every key/value group must be equally many; a group with none left loses its key and value head too.
    """
    layers, arch = transformer_layers(model)
    plans = []  # everything is checked before anything is sliced
    for index, given in _per_layer("heads", heads, layers).items():
        attn, q, k, v, o, width = _attention(layers[index], arch)
        n_heads, n_kv = q.out_features // width, k.out_features // width
        gone = set(_indices("head", f"layer {index}", given, n_heads))
        kept = [h for h in range(n_heads) if h not in gone]
        group = n_heads // n_kv
        per_group = {g: sum(h // group == g for h in kept) for g in range(n_kv)}
        sizes = {c for c in per_group.values() if c}
        if len(sizes) != 1:
            raise ValueError(f"layer {index}: the kept query heads per key/value group would be {per_group}; "
                             "grouped-query attention needs the same number in every remaining group")
        plans.append((layers[index], kept, [g for g in range(n_kv) if per_group[g]], sizes.pop()))
    for layer, kept, kv_kept, group in plans:
        attn, q, k, v, o, width = _attention(layer, arch)
        if not hasattr(attn, "lightlm_heads"):
            attn.lightlm_heads, attn.lightlm_original_heads = list(range(q.out_features // width)), \
                q.out_features // width
        attn.lightlm_heads = [attn.lightlm_heads[h] for h in kept]
        _slice(q, rows=_heads(kept, width))
        _slice(o, cols=_heads(kept, width))
        _slice(k, rows=_heads(kv_kept, width))
        _slice(v, rows=_heads(kv_kept, width))
        if arch == "bert":
            attn.num_attention_heads, attn.all_head_size = len(kept), len(kept) * width
        else:
            attn.num_key_value_groups = group
    _sync_config(model, layers, arch)
    return model


def prune_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove FFN neurons, ``{layer: [neuron indices]}``: their rows of the up (and gate) projection and their
    columns of the down projection. Equal to the original with those neurons' activations zeroed."""
    layers, arch = transformer_layers(model)
    plans = []
    for index, given in _per_layer("neurons", neurons, layers).items():
        width = _ffn(layers[index], arch)[1].in_features
        gone = set(_indices("neuron", f"layer {index}", given, width))
        plans.append((layers[index], torch.tensor([i for i in range(width) if i not in gone], dtype=torch.long)))
    for layer, kept in plans:
        ups, down = _ffn(layer, arch)
        for up in ups:
            _slice(up, rows=kept)
        _slice(down, cols=kept)
        if hasattr(getattr(layer, "mlp", None), "intermediate_size"):
            layer.mlp.intermediate_size = len(kept)
    _sync_config(model, layers, arch)
    return model


def drop_layers(model: nn.Module, indices: Iterable[int]) -> nn.Module:
    """Remove whole Transformer layers (their residual branches: the hidden state passes straight on). The
    remaining layers are renumbered (``layer_idx``, used by the KV cache) and ``config.num_hidden_layers``
    shrinks."""
    layers, arch = transformer_layers(model)
    gone = _indices("layer", "the model", indices, len(layers))
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]
    for i in reversed(gone):
        del layers[i]  # nn.ModuleList renumbers its keys
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    _sync_config(model, layers, arch)
    return model
