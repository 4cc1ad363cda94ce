"""SmolLM2's held-out perplexity after weight-only post-training quantization (chapter 10), computed once and cached.

Every nn.Linear of SmolLM2-135M's 30 Transformer layers (the embedding and the tied output layer are not) is
replaced by its quantized-then-de-quantized weights — what a weight-only integer kernel multiplies by — and the
perplexity is measured on chapter 8's held-out news windows, as chapter 9's pruned variants are
(:func:`lightlm.artefacts.pruned_lm.heldout_perplexity`). The variants (:data:`SETTINGS`):

* ``int8``, ``int4``: round-to-nearest, one affine (scale, zero point) per output row (:func:`lightlm.quant_gptq.
  rtn_quantize`); ``int4-g64``, ``int3-g64``: the same per group of 64 input columns;
* ``gptq-int4``, ``gptq-int3-g64``: GPTQ on the same grids, calibrated layer by layer on the first
  ``n_calibration`` training windows (each layer on the outputs of the quantized layers before it, as
  :mod:`lightlm.artefacts.pruned_lm` does for SparseGPT);
* ``nf4``: QLoRA's NormalFloat4, blocks of 64 with double quantization (:mod:`lightlm.quant_formats`);
* ``q8_0``, ``q4_0``, ``q4_1``: the GGUF blocks llama.cpp stores (:func:`lightlm.quant_formats.gguf_quantize`).

The bytes are those of the stored form: codes at ``bits`` bits, fp16 scales and zero points at ``bits`` bits
for the integer grids (as GPTQ checkpoints pack them); the raw blocks for GGUF; the packed codes and (quantized)
scales for NF4. SmolLM2 ships as a Q4_1 GGUF (:mod:`lightlm.zoo`), so its float weights already lie on a 4-bit
grid in blocks of 32: ``q4_1`` gives them back exactly, and groups aligned with those blocks would flatter any
4-bit method; the groups here are per row or of 64. ``python -m lightlm.zoo warm quantized-lm`` builds it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .. import zoo
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool, check_choice, check_module, check_tensor
from .._packages import versions
from ..prune_structured import transformer_layers
from ..quant_formats import gguf_dequantize, gguf_quantize, nf4_dequantize, nf4_nbytes, nf4_quantize
from ..quant_gptq import gptq_sequential, rtn_quantize
from .pruned_lm import heldout_perplexity, layer_inputs

__all__ = ["SETTINGS", "VARIANTS", "quantized_lm_path", "quantized_lm_inputs", "quantize_lm", "build_quantized_lm",
           "load_quantized_lm", "warm_quantized_lm"]

# name -> (method, bits, group size): method "rtn", "gptq", "nf4" or a GGUF kind
VARIANTS = {"int8": ("rtn", 8, None), "int4": ("rtn", 4, None), "gptq-int4": ("gptq", 4, None),
            "int4-g64": ("rtn", 4, 64), "int3-g64": ("rtn", 3, 64), "gptq-int3-g64": ("gptq", 3, 64),
            "nf4": ("nf4", 4, 64), "q8_0": ("Q8_0", 8, 32), "q4_0": ("Q4_0", 4, 32), "q4_1": ("Q4_1", 4, 32)}
SETTINGS = {"version": 1, "variants": list(VARIANTS), "n_calibration": 256, "blocksize": 128, "damp": 0.01,
            "eval_batch": 32}
_FOLDER, _RESULTS = "smollm2-quantized-perplexity", "results.json"


def quantized_lm_path() -> Path:
    """Folder of the cached table."""
    return zoo.cache_dir() / _FOLDER


def quantized_lm_inputs() -> dict:
    """What the table is computed from: :data:`SETTINGS`, the model, chapter 8's cache and the library versions."""
    from . import lm_cache

    return {"settings": SETTINGS, "model": zoo.smollm2_inputs(), "lm_cache": lm_cache.lm_cache_inputs(),
            "precision": "fp32", "packages": {"torch": torch.__version__, **versions("transformers")}}


def _grid_bytes(entry: dict, bits: int) -> int:
    """Codes at ``bits`` bits, fp16 scales, zero points at ``bits`` bits (whole bytes per tensor)."""
    return math.ceil(entry["codes"].numel() * bits / 8) + 2 * entry["scale"].numel() + \
        math.ceil(entry["zero_point"].numel() * bits / 8)


def _linears(layers: nn.ModuleList) -> list[nn.Linear]:
    return [mod for layer in layers for mod in layer.modules() if isinstance(mod, nn.Linear)]


@torch.no_grad()
def quantize_lm(model: nn.Module, variant: str, calibration_ids: torch.Tensor | None = None, *,
                blocksize: int = 128, damp: float = 0.01) -> int:
    """Quantize every nn.Linear of a Llama-style model's Transformer layers in place (weights replaced by their
    de-quantized values) as :data:`VARIANTS` names; GPTQ variants need ``calibration_ids`` (windows, seq).
    Returns the bytes of the stored (quantized) weights."""
    check_module("model", model)
    method, bits, group = VARIANTS[check_choice("variant", variant, tuple(VARIANTS))]
    layers, arch = transformer_layers(model)
    if arch != "llama":
        raise TypeError(f"quantize_lm quantizes Llama-style decoders, got a {arch} layout")
    if method == "gptq":
        check_tensor("calibration_ids", calibration_ids, kind="int", ndim=2)
        hidden, kwargs = layer_inputs(model, layers, calibration_ids)
        total = 0
        for layer in layers:
            stored = gptq_sequential(layer, [{"hidden_states": hidden, **kwargs}], bits, group,
                                     blocksize=blocksize, damp=damp)
            total += sum(_grid_bytes(entry, bits) for entry in stored.values())
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # the quantized layer's outputs feed the next
        return total
    total = 0
    for linear in _linears(layers):
        weight = linear.weight
        if method == "rtn":
            entry = rtn_quantize(weight, bits, group)
            new, total = entry["weight"], total + _grid_bytes(entry, bits)
        elif method == "nf4":
            stored = nf4_quantize(weight, block_size=group, double_quant=True)
            new, total = nf4_dequantize(stored), total + nf4_nbytes(stored)
        else:
            blocks = gguf_quantize(weight, method)
            new, total = gguf_dequantize(blocks, method, weight.shape), total + blocks.numel()
        weight.copy_(new.to(weight.dtype))
    return total


def _build(staging: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from . import lm_cache

    cache = lm_cache.load_lm_cache(progress=progress)
    calibration, heldout = cache["train_ids"][:SETTINGS["n_calibration"]].long(), cache["heldout_ids"].long()
    _, model = zoo.load_smollm2(progress=progress)
    dense = {name: t.clone() for name, t in model.state_dict().items()}
    weights = _linears(transformer_layers(model)[0])
    params = sum(linear.weight.numel() for linear in weights)
    results = {"dense": heldout_perplexity(model, heldout, SETTINGS["eval_batch"]), "params": params,
               "dense_bytes": 4 * params, "perplexity": {}, "bytes": {}, "seconds": {}}
    for variant in tqdm(SETTINGS["variants"], desc="SmolLM2 quantized (chapter 10)", disable=not progress):
        model.load_state_dict(dense)
        started = time.perf_counter()
        results["bytes"][variant] = quantize_lm(model, variant, calibration, blocksize=SETTINGS["blocksize"],
                                                damp=SETTINGS["damp"])
        results["seconds"][variant] = round(time.perf_counter() - started, 1)
        results["perplexity"][variant] = heldout_perplexity(model, heldout, SETTINGS["eval_batch"])
    (staging / _RESULTS).write_text(json.dumps(results, indent=1))
    return {"dense_perplexity": results["dense"]}


def build_quantized_lm(progress: bool = True) -> Path:
    """Make sure the table is cached (a few CPU minutes the first time); returns its folder."""
    check_bool("progress", progress)
    return ensure(_FOLDER, quantized_lm_inputs(), lambda staging: _build(staging, progress))


def load_quantized_lm(progress: bool = True) -> dict:
    """``{"dense": ppl, "dense_bytes", "params", "perplexity": {variant: ppl}, "bytes": {variant: bytes},
    "seconds": {...}, "settings": SETTINGS}`` (built first if missing)."""
    folder = build_quantized_lm(progress)
    return {**json.loads((folder / _RESULTS).read_text()), "settings": read_manifest(folder)["inputs"]["settings"]}


def warm_quantized_lm() -> str:
    """``python -m lightlm.zoo warm quantized-lm``: build the table unless it is already cached."""
    cached = inspect(quantized_lm_path(), quantized_lm_inputs()) is None
    results = load_quantized_lm(progress=True)
    return (f"{'cached' if cached else 'built'} at {quantized_lm_path()}; dense perplexity {results['dense']:.2f}, "
            f"GPTQ int4 {results['perplexity']['gptq-int4']:.2f}")
