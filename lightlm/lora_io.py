"""Saving and loading LoRA adapters in PEFT's format, chapter 12: a few megabytes that turn one base model into
many task models.

A LoRA adapter is the matrices A and B of every wrapped layer (and the weights of the modules trained in full, such
as a new classification head), not the base model. PEFT 0.21.2 writes a folder with two files, and so does
:func:`save_adapter`, so that either library loads what the other saved:

* ``adapter_model.safetensors`` — one tensor per key ``base_model.model.<module path>.lora_A.weight`` (r × d_in)
  and ``...lora_B.weight`` (d_out × r); a module to save keeps its own keys, ``base_model.model.<path>.weight``.
  (PEFT's in-memory names carry the adapter name, ``lora_A.default.weight``; the file drops it.)
* ``adapter_config.json`` — ``peft_type`` "LORA", ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
  ``use_rslora``, ``fan_in_fan_out`` (True for GPT-2's Conv1D), ``modules_to_save``, ``task_type``,
  ``base_model_name_or_path`` ...: what it takes to rebuild the same wrapping on a fresh base model.

Its size, 4 bytes × r · (d_in + d_out) per wrapped matrix in float32 (plus the head), is the "adapter bytes" of
the chapter: compare it with the base model's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import check_choice, check_module
from .lora import add_lora, lora_layers, lora_settings, matching_names, remove_lora

__all__ = ["save_adapter", "load_adapter", "adapter_nbytes", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel.base_model (a LoraModel) .model (the wrapped transformers model)
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Options of PEFT's LoraConfig this module does not implement: each must be off (false, null, empty) to load.
UNSUPPORTED = ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
               "exclude_modules", "target_parameters", "trainable_token_indices", "layer_replication", "use_qalora",
               "use_bdlora", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
               "alora_invocation_tokens", "megatron_config")
CLASSIFIER_NAMES = ("classifier", "score")  # PEFT adds these to modules_to_save for SEQ_CLS and TOKEN_CLS


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own names: each LoRA A and B, and the state of the modules to save."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.weight
    for name in lora_settings(model)["saved_modules"]:
        for key, tensor in model.get_submodule(name).state_dict(keep_vars=True).items():
            tensors[f"{name}.{key}"] = tensor
    return tensors


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Write ``model``'s LoRA adapter (after :func:`~lightlm.lora.add_lora`) to ``folder`` in PEFT's format.

    Args:
        model: a model with LoRA layers (merged or not: A and B are saved either way).
        folder: created if missing; ``adapter_model.safetensors`` and ``adapter_config.json`` are (over)written.
        base_model_name_or_path: the base model's hub name or path, recorded for the reader (PEFT uses it to
            find the base when none is given).
        task_type: PEFT's task type ("SEQ_CLS", "CAUSAL_LM", ...) or None.

    Returns the folder's path. The tensors are copied to the CPU to be written.
    """
    from safetensors.torch import save_file

    check_module("model", model)
    settings = lora_settings(model)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str or None, got {type(base_model_name_or_path).__name__}")
    check_choice("task_type", task_type, TASK_TYPES)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + key: tensor.detach().to("cpu").clone().contiguous()  # clone: tied tensors are saved apart
               for key, tensor in _adapter_tensors(model).items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    alpha = settings["alpha"]
    config = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
              "r": settings["r"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
              "lora_dropout": settings["dropout"], "target_modules": settings["target_modules"],
              "use_rslora": settings["rslora"], "fan_in_fan_out": settings["fan_in_fan_out"], "bias": "none",
              "modules_to_save": settings["modules_to_save"] or None, "init_lora_weights": True,
              "inference_mode": True, "revision": None, "use_dora": False, "lora_bias": False,
              "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _folder(folder: Any) -> Path:
    """A folder holding both adapter files (ValueError naming what is missing)."""
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"folder must be a str or Path, got {type(folder).__name__}")
    folder = Path(folder)
    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a saved adapter: missing {', '.join(missing)} (PEFT's "
                         "save_pretrained(..., safe_serialization=True) or lightlm.lora_io.save_adapter write them)")
    return folder


def _read_config(folder: Path) -> dict:
    """adapter_config.json, checked: a plain LoRA adapter whose options lightlm implements."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder / CONFIG_NAME}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{folder / CONFIG_NAME}: bias={config['bias']!r} is not supported (only 'none')")
    used = [key for key in UNSUPPORTED if config.get(key)]
    if used:
        raise ValueError(f"{folder / CONFIG_NAME} uses options lightlm does not implement: "
                         + ", ".join(f"{key}={config[key]!r}" for key in used))
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):  # PiSSA, OLoRA, LoftQ ... also change the base weights
        raise ValueError(f"{folder / CONFIG_NAME}: init_lora_weights={init!r} is not supported (it changes the base "
                         "model's weights too); supported: true, false, 'gaussian'")
    return config


def _few(items: list[str], shown: int = 6) -> str:
    """'a, b, c' or 'a, b, ... (10 in all)'."""
    return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Wrap ``model`` as the adapter in ``folder`` says (saved by lightlm or PEFT) and load its weights, in place.

    Calls :func:`~lightlm.lora.add_lora` with the saved settings, then copies every tensor in (cast to the
    parameter's dtype, on its device). Strict: a key of the file that the wrapped model lacks, or a LoRA or
    module-to-save tensor the file lacks, is a ValueError naming them, and the model is left as it was.
    PEFT adds "classifier" and "score" to ``modules_to_save`` for classification tasks; those the model lacks
    are skipped, as PEFT does.

    Returns the model.
    """
    from safetensors.torch import load_file

    check_module("model", model)
    folder = _folder(folder)
    config = _read_config(folder)
    saves = list(dict.fromkeys(config.get("modules_to_save") or []))  # PEFT may repeat a name
    saves = [name for name in saves if name not in CLASSIFIER_NAMES or matching_names(model, [name])]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    if not config.get("target_modules"):
        raise ValueError(f"{folder / CONFIG_NAME} names no target_modules (PEFT infers them from the model type; "
                         "lightlm needs them written out)")
    add_lora(model, config["target_modules"], r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
             dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False),
             modules_to_save=saves or None)
    expected = _adapter_tensors(model)
    stored = {key.removeprefix(PREFIX) if key.startswith(PREFIX) else key: tensor
              for key, tensor in load_file(str(folder / WEIGHTS_NAME)).items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    shapes = [f"{key}: file {tuple(stored[key].shape)}, model {tuple(expected[key].shape)}"
              for key in expected if key in stored and expected[key].shape != stored[key].shape]
    if missing or unexpected or shapes:
        remove_lora(model, merge=False)  # leave the model as it was
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ:", shapes))
        problems = [f"{what} {_few(keys)}" for what, keys in found if keys]
        raise ValueError(f"{folder / WEIGHTS_NAME} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(stored[key])  # cast to the parameter's dtype and device
    return model


def adapter_nbytes(folder: str | Path) -> int:
    """Bytes on disk of the adapter's weights file, ``adapter_model.safetensors`` (tensors and their header)."""
    return (_folder(folder) / WEIGHTS_NAME).stat().st_size
