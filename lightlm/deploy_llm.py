"""Running a causal LM in a CPU runtime: export with ONNX Runtime GenAI's model builder, check it, time it (ch. 14).

:func:`export_llm` runs ``python -m onnxruntime_genai.models.builder`` on a Hugging Face Llama-style folder. The
builder writes one ONNX graph whose operators are already fused for decoding: ``GroupQueryAttention`` (rotary
embedding, attention over a key/value cache and the softmax in one kernel), ``SkipSimplifiedLayerNormalization``
(residual add + RMSNorm) and, at ``precision="int4"``, ``MatMulNBits``: weight-only 4-bit blocks of 32 along
the input dimension, symmetric, de-quantized inside the matrix-product kernel; the activations are quantized to
int8 per block for the dot products (the CPU default, ``accuracy_level`` 4). The embedding table shares the
output layer's int4 blocks (``GatherBlockQuantized``). ``genai_config.json`` tells the runtime how to drive it:
``past_present_share_buffer`` makes the cache one buffer of ``max_length`` positions written in place (a static
KV cache) instead of a tensor concatenated each step.

The export is returned only after its next-token logits on :data:`CHECK_PROMPTS` agree with the PyTorch model's
(:func:`compare_logits`): within ``max_abs`` at fp32; at int4 a top-1 agreement of at least ``min_top1`` and a
mean KL(PyTorch || export) of at most ``max_kl``. :class:`ExportedLLM` gives the full-sequence logits of an
export (an ``onnxruntime.InferenceSession`` on its graph, an empty cache) for those checks and for
:func:`lightlm.llm_bench.perplexity`, and greedy generation through ``onnxruntime_genai``
(:mod:`lightlm.llm_bench` times a PyTorch model and an export the same way, so one run compares them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ._checks import check_choice, check_int, check_real, check_tensor
from .deploy import PINS as _ONNX_PINS
from .deploy import ExportMismatchError, MissingDeployPackageError

__all__ = ["PINS", "PRECISIONS", "CHECK_PROMPTS", "ExportedLLM", "export_llm", "compare_logits"]

PINS = {"onnxruntime-genai": "0.18.0", "onnxruntime": _ONNX_PINS["onnxruntime"]}  # as in requirements.txt
PRECISIONS = ("fp32", "int4")
CHECK_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
                 "The stock market fell sharply on Monday after", "Water boils at a temperature of")
_REPORT = "lightlm-export.json"


def _genai():
    try:
        import onnxruntime_genai
    except ImportError as error:
        pins = " ".join(f"{name}=={version}" for name, version in PINS.items())
        raise MissingDeployPackageError(f"lightlm.deploy_llm needs onnxruntime-genai, and importing it failed "
                                        f"({error}). Install the version lightlm was tested with:  pip install "
                                        f"{pins}") from None
    return onnxruntime_genai


def _folder(name: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _llama_config(model_dir: Path) -> dict:
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir must be a Hugging Face checkpoint folder with a config.json; {model_dir} has none")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"export_llm exports Llama-style checkpoints (model_type 'llama', as SmolLM2); "
                         f"{model_dir} has model_type {config.get('model_type')!r}")
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(f"model_dir must hold the weights as .safetensors; {model_dir} has none")
    return config


class ExportedLLM:
    """A folder written by :func:`export_llm` (``model.onnx``, its weights, ``genai_config.json``, the tokenizer).

    Args:
        path: the folder.
        threads: threads inside one operator (``intra_op_num_threads``) for both runtimes; default
            ``torch.get_num_threads()``, so the export and PyTorch are timed on the same cores.

    Attributes: ``path``, ``threads``, ``config`` (the graph's model section of ``genai_config.json``),
    ``nbytes`` (bytes of the graph and its weights on disk), ``check`` (what :func:`export_llm` verified, or None).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = _folder("path", path)
        self.threads = torch.get_num_threads() if threads is None else check_int("threads", threads, min=1)
        if not (self.path / "genai_config.json").is_file():
            raise FileNotFoundError(f"{self.path} holds no genai_config.json: not a model builder export")
        self.config = json.loads((self.path / "genai_config.json").read_text())["model"]
        report = self.path / _REPORT
        self.check: dict | None = json.loads(report.read_text()) if report.is_file() else None
        self._session = self._model = None

    @property
    def nbytes(self) -> int:
        return sum(file.stat().st_size for file in self.path.glob("model.onnx*"))

    def _ort(self):
        if self._session is None:
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.log_severity_level = self.threads, 3
            self._session = ort.InferenceSession(str(self.path / self.config["decoder"]["filename"]), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def genai_model(self):
        """The ``onnxruntime_genai.Model`` (loaded once), with ``threads`` intra-op threads."""
        if self._model is None:
            og = _genai()
            config = og.Config(str(self.path))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads}}}}))
            self._model = og.Model(config)
        return self._model

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position, (batch, seq, vocab) float32, from the graph with an empty cache."""
        check_tensor("input_ids", input_ids, kind="int", ndim=2)
        decoder, (batch, length) = self.config["decoder"], input_ids.shape
        feed = {"input_ids": input_ids.cpu().to(torch.int64).numpy(),
                "attention_mask": torch.ones(batch, length, dtype=torch.int64).numpy()}
        empty = torch.zeros(batch, decoder["num_key_value_heads"], 0, decoder["head_size"]).numpy()
        for layer in range(decoder["num_hidden_layers"]):
            for kind in ("key", "value"):
                feed[decoder["inputs"][f"past_{kind}_names"] % layer] = empty
        return torch.from_numpy(self._ort().run([decoder["outputs"]["logits"]], feed)[0]).to(input_ids.device)

    def __repr__(self) -> str:
        return f"ExportedLLM({str(self.path)!r}, {self.nbytes / 1e6:.1f} MB, threads={self.threads})"


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How far ``logits`` are from ``reference`` (both (..., vocab)): ``max_abs`` difference, ``top1`` (share of
    positions with the same argmax) and ``kl``, the mean KL(softmax(reference) || softmax(logits)) in nats."""
    check_tensor("reference", reference, kind="float", min_ndim=1)
    check_tensor("logits", logits, kind="float", min_ndim=1)
    if reference.shape != logits.shape:
        raise ValueError(f"reference and logits must have the same shape, got {tuple(reference.shape)} and "
                         f"{tuple(logits.shape)}")
    ref, new = reference.double(), logits.to(reference.device).double()
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(new, -1)
    return {"max_abs": (ref - new).abs().max().item(),
            "top1": (ref.argmax(-1) == new.argmax(-1)).double().mean().item(),
            "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()}


def _prompt_ids(tokenizer, prompts) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(text)["input_ids"]]) for text in prompts]


def export_llm(model_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "int4", *,
               reference: torch.nn.Module | None = None, max_abs: float = 1e-3, min_top1: float = 0.3,
               max_kl: float = 1.5, extra_options: dict[str, Any] | None = None) -> ExportedLLM:
    """Export a Llama-style Hugging Face folder for the CPU with ONNX Runtime GenAI's model builder; check it.

    Args:
        model_dir: the checkpoint folder (``config.json`` with model_type ``llama``, .safetensors weights, the
            tokenizer). A GPTQ checkpoint (``quantization_config``) keeps its own int4 weights.
        out_dir: where the export goes; it must not exist yet or be empty.
        precision: ``"fp32"`` or ``"int4"``.
        reference: the PyTorch model the export must agree with; default the model loaded from ``model_dir``.
        max_abs: fp32: the largest allowed |logit difference| on :data:`CHECK_PROMPTS`.
        min_top1, max_kl: int4: the least share of positions with the reference's top-1 token and the largest
            mean KL(reference || export), over every position of :data:`CHECK_PROMPTS`.
        extra_options: the builder's ``--extra_options`` (e.g. ``{"block_size": 64}``).

    Raises :class:`~lightlm.deploy.ExportMismatchError` (with the measured values) when the check fails, and a
    ``RuntimeError`` with the builder's last lines when it fails. The check is saved in ``lightlm-export.json``.
    """
    model_dir, out_dir = _folder("model_dir", model_dir), _folder("out_dir", out_dir)
    precision = check_choice("precision", precision, PRECISIONS)
    bounds = {"max_abs": check_real("max_abs", max_abs, min=0, min_open=True),
              "min_top1": check_real("min_top1", min_top1, min=0, max=1),
              "max_kl": check_real("max_kl", max_kl, min=0, min_open=True)}
    if extra_options is not None and not isinstance(extra_options, dict):
        raise TypeError(f"extra_options must be a dict or None, got {type(extra_options).__name__}")
    if reference is not None and not isinstance(reference, torch.nn.Module):
        raise TypeError(f"reference must be a torch.nn.Module or None, got {type(reference).__name__}")
    if not model_dir.is_dir():
        raise ValueError(f"model_dir {model_dir} is not a folder")
    _llama_config(model_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir {out_dir} exists and is not an empty folder; choose a new one")
    _genai()
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(model_dir), "-i", str(model_dir),
               "-o", str(out_dir), "-p", precision, "-e", "cpu", "-c", str(out_dir / "builder-cache")]
    if extra_options:
        command += ["--extra_options", *(f"{key}={value}" for key, value in extra_options.items())]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shutil.rmtree(out_dir / "builder-cache", ignore_errors=True)
    if done.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"the model builder failed (exit {done.returncode}) on {model_dir}:\n{tail}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if reference is None:
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    exported = ExportedLLM(out_dir)
    with torch.no_grad():
        pairs = [(reference(input_ids=ids.to(_device(reference))).logits[0].float().cpu(), exported.logits(ids)[0])
                 for ids in _prompt_ids(tokenizer, CHECK_PROMPTS)]
    measured = compare_logits(torch.cat([ref for ref, _ in pairs]), torch.cat([new for _, new in pairs]))
    report = {"precision": precision, "prompts": list(CHECK_PROMPTS), **measured, "bounds": bounds}
    failed = (measured["max_abs"] > bounds["max_abs"]) if precision == "fp32" else \
        (measured["top1"] < bounds["min_top1"] or measured["kl"] > bounds["max_kl"])
    if failed:
        raise ExportMismatchError(f"the {precision} export disagrees with the PyTorch model on CHECK_PROMPTS: "
                                  f"max |Δlogit| {measured['max_abs']:.3g}, top-1 agreement {measured['top1']:.3f},"
                                  f" KL {measured['kl']:.3g} (bounds {bounds}); it is left in {out_dir}")
    (out_dir / _REPORT).write_text(json.dumps(report, indent=1))
    exported.check = report
    return exported


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
