"""SmolLM2's held-out perplexity after one-shot pruning (chapter 9, "Pruning"), computed once and cached.

Pruning all 30 layers of SmolLM2-135M with SparseGPT and evaluating every variant takes minutes on two CPU
cores, too long for the chapter's budget, so it runs here, once, and the chapter reads the table. For each
method (``magnitude``, ``wanda``, ``sparsegpt``) and target (unstructured sparsities and the 2:4 pattern)
every nn.Linear of the 30 Transformer layers is pruned (the embedding and the tied output layer are not), and
the perplexity is measured on chapter 8's held-out news windows (:func:`lightlm.artefacts.lm_cache.load_lm_cache`).

Wanda and SparseGPT are calibrated on the first ``n_calibration`` training windows of the same cache and run
layer by layer, as their reference code does: the calibration hidden states enter layer 0, each layer is
pruned with :func:`lightlm.prune_calib.prune_sequential` (its Linears in call order, each group seeing the
outputs of the already-pruned groups before it), and the pruned layer's outputs feed the next layer. That is
the same computation as ``prune_sequential`` on the whole model (the tests check it on a tiny Llama), in
O(layers) forward passes instead of O(layers²). ``python -m lightlm.zoo warm pruned-lm`` builds it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .. import zoo
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool, check_choice, check_module, check_tensor
from .._packages import versions
from ..prune import magnitude_mask, nm_mask
from ..calibrate import StopForward, run_batch
from ..llm_bench import perplexity
from ..prune_calib import prune_sequential
from ..prune_structured import transformer_layers

__all__ = ["SETTINGS", "pruned_lm_path", "pruned_lm_inputs", "parse_target", "layer_inputs", "prune_lm",
           "heldout_perplexity", "build_pruned_lm", "load_pruned_lm", "warm_pruned_lm"]

SETTINGS = {"version": 1, "methods": ["magnitude", "wanda", "sparsegpt"], "targets": ["0.3", "0.5", "0.7", "2:4"],
            "n_calibration": 32, "blocksize": 128, "damp": 0.01, "eval_batch": 32}
_FOLDER, _RESULTS = "smollm2-pruned-perplexity", "results.json"


def pruned_lm_path() -> Path:
    """Folder of the cached table."""
    return zoo.cache_dir() / _FOLDER


def pruned_lm_inputs() -> dict:
    """What the table is computed from: :data:`SETTINGS`, the model, chapter 8's cache and the library versions."""
    from . import lm_cache

    return {"settings": SETTINGS, "model": zoo.smollm2_inputs(), "lm_cache": lm_cache.lm_cache_inputs(),
            "precision": "fp32", "packages": {"torch": torch.__version__, **versions("transformers")}}


def parse_target(target: str) -> dict:
    """``"0.5"`` → ``{"sparsity": 0.5}``; ``"2:4"`` → ``{"n": 2, "m": 4}``."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a str such as '0.5' or '2:4', got {type(target).__name__}")
    try:
        if ":" in target:
            n, m = (int(part) for part in target.split(":"))
            if not 1 <= n <= m:
                raise ValueError
            return {"n": n, "m": m}
        sparsity = float(target)
        if not 0 <= sparsity < 1:
            raise ValueError
        return {"sparsity": sparsity}
    except ValueError:
        raise ValueError(f"target must be a sparsity in [0, 1) such as '0.5' or an N:M pattern with "
                         f"1 <= N <= M such as '2:4', got {target!r}") from None


def layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states entering layer 0 for ``ids`` and the other keyword arguments the model passes it."""
    captured = {}

    def catch(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        raise StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            run_batch(model, {"input_ids": ids, "use_cache": False})  # stops at layer 0
    finally:
        handle.remove()
    return captured["hidden"], {**captured["kwargs"], "use_cache": False}


@torch.no_grad()
def prune_lm(model: nn.Module, calibration_ids: torch.Tensor | None, method: str, target: str, *,
             blocksize: int = 128, damp: float = 0.01) -> None:
    """Prune every nn.Linear of a Llama-style model's Transformer layers in place (chapter 9).

    ``magnitude`` needs no calibration (a per-tensor magnitude mask, or 2:4 of |W| along each row); ``wanda``
    and ``sparsegpt`` run layer by layer on ``calibration_ids`` (windows, seq), each layer calibrated on the
    outputs of the already-pruned layers before it (see the module docstring)."""
    check_module("model", model)
    method = check_choice("method", method, ("magnitude", "wanda", "sparsegpt"))
    goal = parse_target(target)
    layers, arch = transformer_layers(model)
    if arch != "llama":
        raise TypeError(f"prune_lm prunes Llama-style decoders, got a {arch} layout")
    if method == "magnitude":
        for linear in (mod for layer in layers for mod in layer.modules() if isinstance(mod, nn.Linear)):
            weight = linear.weight
            keep = magnitude_mask(weight, goal["sparsity"]) if "sparsity" in goal else \
                nm_mask(weight.abs(), goal["n"], goal["m"])
            weight.mul_(keep.to(weight.dtype))
        return
    check_tensor("calibration_ids", calibration_ids, kind="int", ndim=2)
    hidden, kwargs = layer_inputs(model, layers, calibration_ids)
    for layer in layers:
        prune_sequential(layer, [{"hidden_states": hidden, **kwargs}], method, **goal, blocksize=blocksize,
                         damp=damp)
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out  # the pruned layer's outputs feed the next one


@torch.inference_mode()
def heldout_perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood of every next token) over windows ``ids`` (n, seq):
    :func:`lightlm.llm_bench.perplexity`, the one implementation the chapters share."""
    return perplexity(model, ids, batch_size)


def _linear_sparsity(model: nn.Module) -> float:
    layers, _ = transformer_layers(model)
    weights = [mod.weight for layer in layers for mod in layer.modules() if isinstance(mod, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _build(staging: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from . import lm_cache

    cache = lm_cache.load_lm_cache(progress=progress)
    calibration, heldout = cache["train_ids"][:SETTINGS["n_calibration"]].long(), cache["heldout_ids"].long()
    _, model = zoo.load_smollm2(progress=progress)
    dense = {name: t.clone() for name, t in model.state_dict().items()}
    results = {"dense": heldout_perplexity(model, heldout, SETTINGS["eval_batch"]), "perplexity": {},
               "sparsity": {}, "seconds": {}}
    runs = [(m, t) for m in SETTINGS["methods"] for t in SETTINGS["targets"]]
    for method, target in tqdm(runs, desc="SmolLM2 pruned (chapter 9)", disable=not progress):
        model.load_state_dict(dense)
        started = time.perf_counter()
        prune_lm(model, calibration, method, target, blocksize=SETTINGS["blocksize"], damp=SETTINGS["damp"])
        results["seconds"].setdefault(method, {})[target] = round(time.perf_counter() - started, 1)
        results["sparsity"].setdefault(method, {})[target] = _linear_sparsity(model)
        results["perplexity"].setdefault(method, {})[target] = heldout_perplexity(model, heldout,
                                                                                  SETTINGS["eval_batch"])
    (staging / _RESULTS).write_text(json.dumps(results, indent=1))
    return {"dense_perplexity": results["dense"]}


def build_pruned_lm(progress: bool = True) -> Path:
    """Make sure the table is cached (a few CPU minutes the first time); returns its folder."""
    check_bool("progress", progress)
    return ensure(_FOLDER, pruned_lm_inputs(), lambda staging: _build(staging, progress))


def load_pruned_lm(progress: bool = True) -> dict:
    """``{"dense": ppl, "perplexity": {method: {target: ppl}}, "sparsity": {...}, "seconds": {...},
    "settings": SETTINGS}`` (built first if missing)."""
    folder = build_pruned_lm(progress)
    return {**json.loads((folder / _RESULTS).read_text()), "settings": read_manifest(folder)["inputs"]["settings"]}


def warm_pruned_lm() -> str:
    """``python -m lightlm.zoo warm pruned-lm``: build the table unless it is already cached."""
    cached = inspect(pruned_lm_path(), pruned_lm_inputs()) is None
    results = load_pruned_lm(progress=True)
    return (f"{'cached' if cached else 'built'} at {pruned_lm_path()}; dense perplexity {results['dense']:.2f}, "
            f"SparseGPT 50% {results['perplexity']['sparsegpt']['0.5']:.2f}")
