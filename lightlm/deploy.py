"""Deploying a classifier: export to ONNX, run it with ONNX Runtime, quantize it to int8 (the capstone chapter).

**ONNX** is a file format for a computation graph: named inputs (``input_ids``, ``attention_mask``; their ``batch``
and ``sequence`` axes symbolic), nodes that are each one standard operator (``Gather``, ``MatMul``, ``Softmax``...)
and the weights as *initializers*. :func:`export_onnx` writes it with ``torch.onnx.export(..., dynamo=True)``:
``torch.export`` traces the forward once into ATen operators (Python control flow is decided then, for the
example inputs) and onnxscript translates each of them.

**ONNX Runtime** rewrites the graph once when it loads it: constants folded, chains fused into one kernel (on BERT,
bias Add + Gelu into ``BiasGelu``, residual Add + LayerNorm into ``SkipLayerNormalization``); it picks a kernel
per node from an *execution provider* (here the CPU's) and plans every buffer. A call then runs those kernels
with no Python between them.

**Dynamic int8 quantization** (:func:`quantize_dynamic_int8`, ONNX Runtime's ``quantize_dynamic``) needs no
calibration data. Offline, the weight W of every Linear (a MatMul by a constant) and embedding table is stored
as int8, symmetric, per output channel j:  s_j = max_i |W_ij| / 127,  q_ij = round(W_ij / s_j) in [−127, 127].
At run time ``DynamicQuantizeLinear`` quantizes each activation X from its own range on that call ("dynamic"):
s_x = (max(X, 0) − min(X, 0)) / 255,  z_x = round(−min(X, 0) / s_x),  X_q = clamp(round(X / s_x) + z_x, 0, 255);
the int8 GEMM ``MatMulInteger`` accumulates uint8 × int8 products in int32 (weights read in a quarter of fp32's
bytes; a VNNI instruction does four multiply-adds per 32-bit lane) and the result is rescaled to float:
Y_ij ≈ s_x · s_j · Σ_k (X_q,ik − z_x) · q_kj.  Attention's activation × activation products stay fp32.

Every result is checked before it is returned: ONNX Runtime's logits against PyTorch's (also at another batch
size and length: the axes are dynamic), int8 against fp32 (top-1 agreement). onnx, onnxscript and onnxruntime
are imported inside the functions only.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._checks import check_bool, check_int, check_module, check_real, check_tensor

__all__ = ["PINS", "MissingDeployPackageError", "ExportMismatchError", "OnnxModel", "export_onnx",
           "quantize_dynamic_int8"]

PINS = {"onnx": "1.23.2", "onnxscript": "0.7.2", "onnxruntime": "1.31.1"}  # as in requirements.txt
INPUT_NAMES = ("input_ids", "attention_mask")


class MissingDeployPackageError(ImportError):
    """onnx, onnxscript or onnxruntime is missing; the message gives the pip line with the pinned versions."""


class ExportMismatchError(ValueError):
    """An exported (or quantized) graph disagrees with its reference beyond the allowed bound."""


def _require(*names: str) -> list[Any]:
    """Import the named packages, or raise :class:`MissingDeployPackageError` with the pip line."""
    try:
        return [importlib.import_module(name) for name in names]
    except ImportError as error:
        pins = " ".join(f"{name}=={version}" for name, version in PINS.items())
        raise MissingDeployPackageError(f"lightlm.deploy needs {', '.join(names)}, and importing them failed ({error})."
                                        f" Install the versions lightlm was tested with:  pip install {pins}") from None


def _check_path(name: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    if Path(path).suffix != ".onnx":
        raise ValueError(f"{name} must name a .onnx file, got {str(path)!r}")
    return Path(path)


def _check_inputs(input_ids: Any, attention_mask: Any, min_length: int = 1) -> None:
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        check_tensor(name, tensor, kind="int", ndim=2)
        if tensor.device.type != "cpu":
            raise ValueError(f"{name} is on {tensor.device}; ONNX Runtime runs on the CPU here: pass CPU tensors")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < min_length:
        raise ValueError(f"input_ids must have a row and at least {min_length} token(s) per row (to export, 2: "
                         f"torch.export fixes an axis of length 1 to 1), got shape {tuple(input_ids.shape)}")


class OnnxModel:
    """An ONNX file run by an ``onnxruntime.InferenceSession`` on the CPU execution provider.

    Args:
        path: the ``.onnx`` file; its inputs must be named ``input_ids`` and ``attention_mask``.
        threads: ONNX Runtime's ``intra_op_num_threads`` (threads inside one operator); default
            ``torch.get_num_threads()``, so ONNX Runtime and PyTorch are compared on the same cores.

    Attributes: ``path``, ``session``, ``threads``, ``nbytes`` (bytes on disk, external data included), ``check``
    (a dict of what the function that made it verified, or None).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = _check_path("path", path)
        self.threads = torch.get_num_threads() if threads is None else check_int("threads", threads, min=1)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path}")
        ort = _require("onnxruntime")[0]
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = self.threads, 3  # log errors only
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        names = tuple(node.name for node in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise ValueError(f"path must hold a graph with inputs {INPUT_NAMES}, got {names}")
        self.check: dict | None = None

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the .onnx file plus every external-data file its initializers point to."""
        onnx = _require("onnx")[0]
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
        graph = onnx.load(str(self.path), load_external_data=False).graph
        files = {ExternalDataInfo(tensor).location for tensor in graph.initializer if uses_external_data(tensor)}
        return self.path.stat().st_size + sum((self.path.parent / name).stat().st_size for name in files)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits for a batch: int CPU tensors (batch, sequence) in, a float32 CPU tensor out."""
        _check_inputs(input_ids, attention_mask)
        feed = {name: tensor.to(torch.int64).contiguous().numpy()
                for name, tensor in zip(INPUT_NAMES, (input_ids, attention_mask))}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, {self.nbytes / 1e6:.2f} MB, threads={self.threads})"


class _Logits(torch.nn.Module):
    """A Hugging Face classifier as the exporter needs it: positional ``input_ids, attention_mask`` -> logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"model must return logits (a tensor, or an output with .logits), got "
                            f"{type(output).__name__}; wrap a bare encoder in a classifier first")
        return logits


def _second_input(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch one row larger and one token shorter (longer if only 2), of tokens taken from ``input_ids``, whose
    last row is padded after half its length: the check that the exported axes (and the mask) are inputs."""
    batch, length = input_ids.shape
    length = length - 1 if length > 2 else length + 1
    generator = torch.Generator().manual_seed(0)
    ids = input_ids.flatten()[torch.randint(input_ids.numel(), (batch + 1, length), generator=generator)]
    mask = torch.ones_like(ids)
    mask[-1, (length + 1) // 2:] = 0
    return ids, mask


@contextmanager
def _quiet():
    """Hide the exporter's and the quantizer's advice (torchvision absent, axis names merged, pre-processing
    advised: its symbolic shape inference fails on these graphs) during the call; errors still show."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for category in (UserWarning, FutureWarning, DeprecationWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _max_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    """max |first − second| (inf if the shapes differ)."""
    return (first.double() - second.double()).abs().max().item() if first.shape == second.shape else float("inf")


def export_onnx(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                path: str | os.PathLike, *, atol: float = 1e-4, check: bool = True,
                threads: int | None = None) -> OnnxModel:
    """Export a Hugging Face sequence classifier to one ``.onnx`` file with dynamic batch and sequence axes.

    Exported in eval mode (no dropout); every module's train/eval flag is restored afterwards. The model must be
    on the CPU, where ONNX Runtime runs it (a model is never moved: call ``model.cpu()`` yourself).
    The weights go into the file; only a model above protobuf's 2 GiB gets a ``<path>.data`` file (see ``nbytes``).

    Args:
        model: called as ``model(input_ids=..., attention_mask=...)``; returns a tensor or an output with ``.logits``.
        input_ids, attention_mask: an example batch (int, (batch, sequence), at least 2 tokens per row).
        path: the ``.onnx`` file to write (its folder is created). threads: for the returned :class:`OnnxModel`.
        atol: largest allowed |ONNX Runtime logit − PyTorch logit|.
        check: compare them on the example batch and on a batch one row larger and one token shorter, with
            padding; the result's ``check`` then holds ``max_abs_diff``, ``shapes`` and ``atol``.

    Raises ExportMismatchError for a difference above ``atol`` (the file is kept for inspection),
    MissingDeployPackageError if onnx, onnxscript or onnxruntime is missing.
    """
    check_module("model", model)
    _check_inputs(input_ids, attention_mask, min_length=2)
    path = _check_path("path", path)
    atol, check = check_real("atol", atol, min=0), check_bool("check", check)
    threads = threads if threads is None else check_int("threads", threads, min=1)  # before the export, not after
    tensors = [*model.parameters(), *model.buffers()]
    if devices := sorted({str(t.device) for t in tensors if t.device.type != "cpu"}):
        raise ValueError(f"model has tensors on {devices}; export_onnx does not move models between devices: "
                         f"call model.cpu() first (ONNX Runtime runs the graph on the CPU)")
    _require("onnx", "onnxscript", "onnxruntime")
    path.parent.mkdir(parents=True, exist_ok=True)
    input_ids, attention_mask = input_ids.to(torch.int64), attention_mask.to(torch.int64)
    modes = {module: module.training for module in model.modules()}
    wrapper = _Logits(model).eval()  # eval() reaches every module of the model
    try:
        batches = [(input_ids, attention_mask), _second_input(input_ids)] if check else []
        with torch.no_grad():
            expected = [wrapper(*batch) for batch in batches] or [wrapper(input_ids, attention_mask)]
        batch_axis, sequence_axis = torch.export.Dim("batch"), torch.export.Dim("sequence")
        large = sum(t.numel() * t.element_size() for t in tensors) > 2**31 - 1  # protobuf's limit: 2 GiB
        with _quiet():
            torch.onnx.export(wrapper, (input_ids, attention_mask), str(path), dynamo=True, external_data=large,
                              dynamic_shapes={name: {0: batch_axis, 1: sequence_axis} for name in INPUT_NAMES},
                              input_names=list(INPUT_NAMES), output_names=["logits"], verbose=False)
    finally:
        for module, training in modes.items():
            module.training = training
    result = OnnxModel(path, threads=threads)
    if check:
        differences = [_max_difference(result(*batch), reference) for batch, reference in zip(batches, expected)]
        shapes = [tuple(batch[0].shape) for batch in batches]
        worst = max(differences)
        if not worst <= atol:
            raise ExportMismatchError(
                f"ONNX Runtime's logits differ from PyTorch's by up to {worst:.3g} (atol {atol:g}; per input shape "
                f"{dict(zip(shapes, differences))}); the exported graph is not the model's forward. The file is "
                f"kept at {path} for inspection")
        result.check = {"max_abs_diff": worst, "shapes": shapes, "atol": atol}
    return result


def quantize_dynamic_int8(model: OnnxModel | str | os.PathLike, out_path: str | os.PathLike, *,
                          check_inputs: tuple[torch.Tensor, torch.Tensor], min_agreement: float = 0.9,
                          per_channel: bool = True, reduce_range: bool = False) -> OnnxModel:
    """ONNX Runtime's dynamic int8 quantization of an fp32 ONNX classifier, checked against it.

    Weights int8 (``QuantType.QInt8``), symmetric, one scale per output channel by default: each channel keeps
    its own range, so small weights are not rounded on the grid of the largest (chapter 7's MiniLM teacher: top-1
    agreement with fp32 0.98 per channel, 0.96 per tensor; largest logit difference 0.7 against 1.5; 0.5% more
    bytes). ``reduce_range=True`` stores 7-bit weights, which avoids the saturating int16 sums of u8×s8 on x86
    CPUs without VNNI, at some accuracy. The result runs on as many threads as the source.

    Args:
        model: the fp32 :class:`OnnxModel` (or its path). out_path: the int8 ``.onnx`` file to write (not model's).
        check_inputs: ``(input_ids, attention_mask)`` on which both run; the result's ``check`` holds ``agreement``
            (the fraction of rows whose top-1 class is the same), ``max_abs_diff``, ``n`` and ``min_agreement``.
        min_agreement: the lowest agreement accepted, in [0, 1].

    Raises ExportMismatchError for an agreement below ``min_agreement`` (the file is kept for inspection).
    """
    if not isinstance(model, (OnnxModel, str, os.PathLike)):
        raise TypeError(f"model must be an OnnxModel or the path of a .onnx file, got {type(model).__name__}")
    model = model if isinstance(model, OnnxModel) else OnnxModel(model)
    out_path = _check_path("out_path", out_path)
    if out_path.resolve() == model.path.resolve():
        raise ValueError(f"out_path must differ from the fp32 model's path, got {str(out_path)!r} for both")
    if not isinstance(check_inputs, (tuple, list)) or len(check_inputs) != 2:
        raise TypeError("check_inputs must be a pair (input_ids, attention_mask)")
    _check_inputs(*check_inputs)
    min_agreement = check_real("min_agreement", min_agreement, min=0, max=1)
    per_channel, reduce_range = check_bool("per_channel", per_channel), check_bool("reduce_range", reduce_range)
    onnx = _require("onnx", "onnxruntime")[0]
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(model.path))
    weights = {tensor.name for tensor in proto.graph.initializer}
    # The quantizer turns a Gemm's weight into a transposed MatMul weight: drop the annotations it would contradict
    kept = [info for info in proto.graph.value_info if info.name not in weights]
    proto.graph.ClearField("value_info")
    proto.graph.value_info.extend(kept)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        quantize_dynamic(proto, str(out_path), per_channel=per_channel, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8)
    result = OnnxModel(out_path, threads=model.threads)
    reference, quantized = model(*check_inputs), result(*check_inputs)
    agreement = (quantized.argmax(-1) == reference.argmax(-1)).double().mean().item()
    result.check = check = {"agreement": agreement, "max_abs_diff": _max_difference(quantized, reference),
                            "n": reference.argmax(-1).numel(), "min_agreement": min_agreement}
    if agreement < min_agreement:
        raise ExportMismatchError(
            f"the int8 model's top-1 class agrees with the fp32 model's on {agreement:.1%} of the {check['n']} "
            f"check rows, below min_agreement {min_agreement:.1%} (largest logit difference "
            f"{check['max_abs_diff']:.3g}); the file is kept at {out_path} for inspection")
    return result
