"""SmolLM2 exported for a CPU runtime (chapter 14): ONNX Runtime GenAI fp32 and int4 models, and the quality table.

Built once by ``python -m lightlm.zoo warm llm-runtime`` (about three CPU minutes):

* ``fp32/``, ``int4/``: :func:`lightlm.deploy_llm.export_llm` of the float32 SmolLM2 (the model builder's own
  int4: symmetric blocks of 32, round-to-nearest, the output layer and the embedding it shares included);
* ``gptq-int4-g64/``: chapter 10's GPTQ (asymmetric grid, groups of 64, calibrated on chapter 8's first 256
  training windows, as chapter 10's GPTQ rows) written as a GPTQ checkpoint
  (:func:`lightlm.quant_gptq.gptq_checkpoint_tensors`) and exported through the same builder, which keeps those
  integers; its control, round-to-nearest on the same grid and path, is measured and not kept;
* ``results.json``: for those exports and for eager PyTorch in fp32, bf16 and torchao's int8 and int4
  weight-only, the held-out perplexity on chapter 8's news windows (from each one's own logits), the top-1
  agreement with eager fp32 at every held-out position, the bytes of weights read per token, each export's
  check and the tokens greedy decoding appends to :data:`SETTINGS`' prompt. Speeds are not cached: chapter 14
  measures them, all in one run.

Why groups of 64 for GPTQ: ONNX Runtime's ``MatMulNBits`` needs blocks of a power of two, so chapter 10's
one-grid-per-row GPTQ cannot be loaded; and SmolLM2's weights come from a Q4_1 file, on an asymmetric 4-bit grid
in blocks of 32, which an asymmetric grid in aligned groups of 32 would give back exactly (chapter 10).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import zoo
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool
from .._packages import versions
from ..deploy_llm import ExportedLLM, export_llm
from ..llm_bench import greedy, linear_bytes, score
from ..prune_structured import transformer_layers
from ..quant_gptq import gptq_checkpoint_tensors, gptq_sequential, rtn_quantize

__all__ = ["SETTINGS", "EXPORTS", "llm_runtime_path", "llm_runtime_inputs", "build_llm_runtime", "load_llm_runtime",
           "eager_variant", "warm_llm_runtime"]

SETTINGS = {"version": 3, "gptq": {"bits": 4, "group_size": 64, "symmetric": False, "n_calibration": 256,
                                   "blocksize": 128, "damp": 0.01},
            "torchao_int4_group": 32, "eval_batch": 16, "prompt": "The printing press changed Europe because",
            "greedy_tokens": 32}
EXPORTS = ("fp32", "int4", "gptq-int4-g64")  # the folders kept
EAGER = ("eager fp32", "eager bf16", "torchao int8", "torchao int4")
_FOLDER, _RESULTS = "smollm2-onnx-runtime", "results.json"


def llm_runtime_path() -> Path:
    """Folder of the cached exports and table."""
    return zoo.cache_dir() / _FOLDER


def llm_runtime_inputs() -> dict:
    """What the artefact is computed from: :data:`SETTINGS`, the model, chapter 8's windows, the library versions."""
    from . import lm_cache

    return {"settings": SETTINGS, "model": zoo.smollm2_inputs(), "lm_cache": lm_cache.lm_cache_inputs(),
            "packages": {"torch": torch.__version__,
                         **versions("transformers", "torchao", "onnxruntime", "onnxruntime-genai")}}


def eager_variant(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The float32 SmolLM2 ``model`` turned, in place, into one of the eager rows of chapter 14's table:
    ``"eager fp32"`` (unchanged), ``"eager bf16"``, ``"torchao int8"`` (``Int8WeightOnlyConfig``: int8 weights
    per output channel, fp32 activations) or ``"torchao int4"`` (torchao's CPU int4 weight-only kernel, groups of
    32; that kernel computes with bf16 activations, so the model is cast to bf16 first)."""
    if name not in EAGER:
        raise ValueError(f"name must be one of {EAGER}, got {name!r}")
    if name == "eager fp32":
        return model
    if name in ("eager bf16", "torchao int4"):
        model.to(torch.bfloat16)
    if name.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig() if name == "torchao int8" else
                  PrototypeInt4WeightOnlyConfig(group_size=SETTINGS["torchao_int4_group"]))
    return model


@torch.no_grad()
def _gptq_checkpoint(model: torch.nn.Module, source: Path, calibration: torch.Tensor, out: Path, method: str) -> None:
    """Quantize ``model``'s Transformer layers (GPTQ or RTN on the :data:`SETTINGS` grid) in place and write them
    as a GPTQ checkpoint folder: packed layers, every other weight as it is, the config and the tokenizer."""
    from safetensors.torch import save_file

    from .pruned_lm import layer_inputs

    cfg = SETTINGS["gptq"]
    bits, group, symmetric = cfg["bits"], cfg["group_size"], cfg["symmetric"]
    layers, _ = transformer_layers(model)
    stored = {}
    if method == "gptq":
        hidden, kwargs = layer_inputs(model, layers, calibration)
    for index, layer in enumerate(layers):
        if method == "gptq":
            found = gptq_sequential(layer, [{"hidden_states": hidden, **kwargs}], bits, group, symmetric=symmetric,
                                    blocksize=cfg["blocksize"], damp=cfg["damp"])
            out_layer = layer(hidden, **kwargs)
            hidden = out_layer[0] if isinstance(out_layer, tuple) else out_layer
        else:
            found = {}
            for name, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    entry = rtn_quantize(module.weight, bits, group, symmetric)
                    module.weight.copy_(entry.pop("weight"))
                    found[name] = entry
        stored.update({f"model.layers.{index}.{name}": entry for name, entry in found.items()})
    tensors = {f"{name}.{key}": value for name, entry in stored.items()
               for key, value in gptq_checkpoint_tensors(entry, bits, symmetric).items()}
    packed = {f"{name}.weight" for name in stored}
    tensors.update({name: value.contiguous() for name, value in model.state_dict().items()
                    if name not in packed and name != "lm_head.weight"})  # the output layer is tied
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
                                     "sym": symmetric}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "generation_config", "chat_template")):
            shutil.copy(file, out / file.name)


def _build(staging: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from . import lm_cache

    cache = lm_cache.load_lm_cache(progress=progress)
    calibration, heldout = cache["train_ids"][:SETTINGS["gptq"]["n_calibration"]].long(), cache["heldout_ids"].long()
    source = zoo.build_smollm2_cache(progress=progress)
    batch = SETTINGS["eval_batch"]
    results = {"perplexity": {}, "top1": {}, "bytes": {}, "checks": {}, "seconds": {}, "greedy": {}}
    tokenizer, _ = zoo.load_smollm2(progress=False)
    prompt = torch.tensor([tokenizer(SETTINGS["prompt"])["input_ids"]])
    reference = None
    steps = [*EAGER, "runtime fp32", "runtime int4", "runtime int4 GPTQ g64", "runtime int4 RTN g64"]
    for name in tqdm(steps, desc="SmolLM2 in a CPU runtime (chapter 14)", disable=not progress):
        started = time.perf_counter()
        if name in EAGER:
            model = eager_variant(zoo.load_smollm2(progress=False)[1], name)
            results["bytes"][name] = linear_bytes(model)
        else:
            _, base = zoo.load_smollm2(progress=False)
            if name in ("runtime fp32", "runtime int4"):
                folder = staging / name.split()[-1]
                model = export_llm(source, folder, name.split()[-1], reference=base)
            else:
                method = "gptq" if "GPTQ" in name else "rtn"
                with tempfile.TemporaryDirectory() as scratch:
                    checkpoint = Path(scratch) / "checkpoint"
                    _gptq_checkpoint(base, source, calibration, checkpoint, method)  # base now holds its weights
                    folder = staging / ("gptq-int4-g64" if method == "gptq" else "rtn-int4-g64")
                    model = export_llm(checkpoint, folder, "int4", reference=base)
            results["bytes"][name], results["checks"][name] = model.nbytes, model.check
        scored = score(model, heldout, batch)
        if reference is None:
            reference = scored["argmax"]
        results["perplexity"][name] = scored["perplexity"]
        results["top1"][name] = (scored["argmax"] == reference).double().mean().item()
        results["greedy"][name] = greedy(model, prompt, SETTINGS["greedy_tokens"])
        results["seconds"][name] = round(time.perf_counter() - started, 1)
        del model
    shutil.rmtree(staging / "rtn-int4-g64")  # measured, not kept: the control for GPTQ
    (staging / _RESULTS).write_text(json.dumps(results, indent=1))
    return {"perplexity": results["perplexity"]}


def build_llm_runtime(progress: bool = True) -> Path:
    """Make sure the exports and the table are cached (about three CPU minutes the first time); their folder."""
    check_bool("progress", progress)
    return ensure(_FOLDER, llm_runtime_inputs(), lambda staging: _build(staging, progress))


def load_llm_runtime(progress: bool = True) -> dict:
    """``{"exports": {folder name: ExportedLLM}, "perplexity", "top1", "bytes", "checks", "seconds", "greedy":
    {row: ...},
    "settings": SETTINGS}`` (built first if missing)."""
    folder = build_llm_runtime(progress)
    results = json.loads((folder / _RESULTS).read_text())
    return {"exports": {name: ExportedLLM(folder / name) for name in EXPORTS}, **results,
            "settings": read_manifest(folder)["inputs"]["settings"]}


def warm_llm_runtime() -> str:
    """``python -m lightlm.zoo warm llm-runtime``: build the exports unless they are already cached."""
    cached = inspect(llm_runtime_path(), llm_runtime_inputs()) is None
    ppl = load_llm_runtime(progress=True)["perplexity"]
    return (f"{'cached' if cached else 'built'} at {llm_runtime_path()}; perplexity eager fp32 "
            f"{ppl['eager fp32']:.2f}, runtime int4 {ppl['runtime int4']:.2f}")
