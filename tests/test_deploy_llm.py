"""lightlm.deploy_llm and lightlm.llm_bench on a tiny Llama: the builder's fp32 export against transformers' own
forward, the int4 export's check recomputed and shown to fail on a wrong reference, greedy tokens against
transformers' ``generate``, perplexity against ``F.cross_entropy``, bytes against the closed form, the GPTQ
checkpoint layout against the model builder's own unpacking code, and every error path. No timing is asserted."""

import json
import math
import shutil
import string
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightlm import deploy_llm, llm_bench
from lightlm.deploy import ExportMismatchError, MissingDeployPackageError
from lightlm.quant_gptq import gptq_checkpoint_tensors, gptq_quantize, rtn_quantize

pytestmark = pytest.mark.usefixtures("one_thread")
CHARS = string.printable


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    # The vocabulary differs from every width: with vocab_size == intermediate_size (128) the model builder 0.18.0
    # wrote an fp32 graph whose logits were off by 0.2-0.4 at every position (measured); 256 and 320 export exactly.
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama checkpoint with a character-level tokenizer (every printable character one token)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {char: index + 3 for index, char in enumerate(CHARS)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    _tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fp32(folder, tmp_path_factory):
    return deploy_llm.export_llm(folder, tmp_path_factory.mktemp("exports") / "fp32", "fp32")


@pytest.fixture(scope="module")
def int4(folder, tmp_path_factory):
    return deploy_llm.export_llm(folder, tmp_path_factory.mktemp("exports") / "int4", "int4")


def _ids(seed: int, shape=(3, 11)) -> torch.Tensor:
    return torch.randint(3, 3 + len(CHARS), shape, generator=torch.Generator().manual_seed(seed))


def _ops(exported) -> set[str]:
    return {node.op_type for node in onnx.load(str(exported.path / "model.onnx"), load_external_data=False).graph.node}


def test_fp32_export_matches_transformers(model, fp32):
    ids = _ids(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(fp32.logits(ids), expected, atol=1e-4, rtol=1e-4)
    assert fp32.check["precision"] == "fp32" and fp32.check["max_abs"] <= fp32.check["bounds"]["max_abs"] == 1e-3
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= _ops(fp32)
    assert json.loads((fp32.path / "lightlm-export.json").read_text())["max_abs"] == fp32.check["max_abs"]
    reopened = deploy_llm.ExportedLLM(fp32.path, threads=1)
    assert reopened.check == fp32.check and reopened.threads == 1 and "MB" in repr(reopened)
    assert reopened.nbytes == sum(f.stat().st_size for f in fp32.path.iterdir() if f.name.startswith("model.onnx"))


def test_int4_check_is_what_it_says(model, folder, int4):
    """The stored check is compare_logits of transformers' logits and ONNX Runtime's on CHECK_PROMPTS."""
    assert "MatMulNBits" in _ops(int4)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    reference, exported = [], []
    for text in deploy_llm.CHECK_PROMPTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            reference.append(model(input_ids=ids).logits[0])
        exported.append(int4.logits(ids)[0])
    measured = deploy_llm.compare_logits(torch.cat(reference), torch.cat(exported))
    for key in ("max_abs", "top1", "kl"):
        assert measured[key] == pytest.approx(int4.check[key], rel=1e-6, abs=1e-9)
    assert int4.check["top1"] >= int4.check["bounds"]["min_top1"] and int4.check["kl"] <= int4.check["bounds"]["max_kl"]
    assert int4.check["max_abs"] > 1e-3  # int4 is lossy: an fp32 bound would have refused it


def test_check_fails_on_a_wrong_reference(folder, tmp_path):
    with pytest.raises(ExportMismatchError, match="max"):
        deploy_llm.export_llm(folder, tmp_path / "fp32", "fp32", reference=_tiny(seed=1))
    with pytest.raises(ExportMismatchError, match="top-1 agreement"):
        deploy_llm.export_llm(folder, tmp_path / "int4", "int4", reference=_tiny(seed=1), max_kl=1e-3)
    assert (tmp_path / "fp32" / "model.onnx").is_file()  # left for inspection, as the message says


def test_compare_logits_closed_form():
    reference = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    logits = torch.tensor([[0.0, 1.0, 2.5], [0.0, 1.0, 0.0]])
    p, q = torch.softmax(reference.double(), -1), torch.softmax(logits.double(), -1)
    kl = (p * (p / q).log()).sum(-1).mean().item()
    assert deploy_llm.compare_logits(reference, logits) == pytest.approx({"max_abs": 1.0, "top1": 0.5, "kl": kl})
    with pytest.raises(ValueError, match="same shape"):
        deploy_llm.compare_logits(reference, logits[:1])
    with pytest.raises(TypeError):
        deploy_llm.compare_logits(reference.long(), logits)


def test_export_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        deploy_llm.export_llm(folder, tmp_path / "a", "int8")
    with pytest.raises(TypeError, match="model_dir"):
        deploy_llm.export_llm(3, tmp_path / "a")
    with pytest.raises(ValueError, match="not a folder"):
        deploy_llm.export_llm(tmp_path / "missing", tmp_path / "a")
    with pytest.raises(ValueError, match="config.json"):
        deploy_llm.export_llm(tmp_path, tmp_path / "a")
    bert = tmp_path / "bert"
    shutil.copytree(folder, bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="Llama-style.*'bert'"):
        deploy_llm.export_llm(bert, tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        deploy_llm.export_llm(folder, tmp_path / "full")
    with pytest.raises(TypeError, match="extra_options"):
        deploy_llm.export_llm(folder, tmp_path / "a", extra_options=["block_size=32"])
    with pytest.raises(TypeError, match="reference"):
        deploy_llm.export_llm(folder, tmp_path / "a", reference="model")
    with pytest.raises(ValueError, match="min_top1"):
        deploy_llm.export_llm(folder, tmp_path / "a", min_top1=1.5)
    with pytest.raises(RuntimeError, match="model builder failed"):
        deploy_llm.export_llm(folder, tmp_path / "b", "int4", extra_options={"block_size": 7})
    with pytest.raises(FileNotFoundError, match="genai_config"):
        deploy_llm.ExportedLLM(tmp_path)


def test_missing_runtime_gives_the_pip_line(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    with pytest.raises(MissingDeployPackageError, match="pip install onnxruntime-genai==0.18.0"):
        deploy_llm.export_llm(folder, tmp_path / "a")


def test_greedy_matches_transformers_generate(model, fp32):
    prompt = _ids(1, (1, 7))
    with torch.no_grad():  # min_new_tokens: end of text is never chosen, as in greedy()
        expected = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones_like(prompt))[0, 7:].tolist()
    assert llm_bench.greedy(model, prompt, 12) == expected
    assert llm_bench.greedy(fp32, prompt, 12) == expected
    assert len(set(expected)) > 1  # not a degenerate model that repeats one token
    with torch.no_grad():  # and end of text was the argmax somewhere: the suppression is exercised
        logits = model(input_ids=torch.cat([prompt, torch.tensor([expected])], 1)).logits[0, 6:-1]
    assert (logits.argmax(-1) == model.config.eos_token_id).any()


def test_speed_helpers_report_medians(model, fp32, int4):
    prompt = _ids(2, (1, 9))
    for subject in (model, fp32, int4):
        decode = llm_bench.decode_speed(subject, prompt, new_tokens=4, repeats=3, warmup=1)
        assert len(decode.seconds) == 3 and decode.tokens == 4 and all(s > 0 for s in decode.seconds)
        assert decode.tokens_per_s == pytest.approx(4 / sorted(decode.seconds)[1])
        prefill = llm_bench.prefill_speed(subject, prompt, repeats=2, warmup=0)
        assert len(prefill.seconds) == 2 and prefill.tokens == 9
        assert prefill.tokens_per_s == pytest.approx(9 / (sum(prefill.seconds) / 2))


def test_speed_and_score_errors(model):
    with pytest.raises(TypeError, match="causal LM"):
        llm_bench.decode_speed("model", _ids(0, (1, 4)))
    with pytest.raises(ValueError, match="one non-empty prompt"):
        llm_bench.decode_speed(model, _ids(0, (2, 4)))
    with pytest.raises(TypeError):
        llm_bench.prefill_speed(model, _ids(0, (1, 4)).float())
    with pytest.raises(ValueError, match="new_tokens"):
        llm_bench.greedy(model, _ids(0, (1, 4)), 0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        llm_bench.perplexity(model, _ids(0, (3, 1)))
    with pytest.raises(TypeError, match="nn.Module"):
        llm_bench.linear_bytes([1])


def test_perplexity_against_cross_entropy(model, fp32):
    windows = _ids(3, (5, 12))
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    flat_logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    scored = llm_bench.score(model, windows, batch_size=2)
    # the same fp32 arithmetic (log-softmax, then the target's entry), summed batch by batch: equal to rounding
    nll = F.cross_entropy(flat_logits, targets, reduction="none").reshape(5, 11)
    total = sum(nll[first:first + 2].sum().item() for first in range(0, 5, 2))
    assert scored["perplexity"] == pytest.approx(math.exp(total / nll.numel()), rel=1e-12)
    # and the float64 value, to fp32 log-softmax rounding (about 1e-7 relative per token)
    assert scored["perplexity"] == pytest.approx(F.cross_entropy(flat_logits.double(), targets).exp().item(), rel=1e-5)
    assert torch.equal(scored["argmax"], logits[:, :-1].argmax(-1))
    assert llm_bench.perplexity(fp32, windows, batch_size=5) == pytest.approx(scored["perplexity"], rel=1e-5)


def test_linear_bytes_closed_form(model):
    # per layer: q (64x64), k and v (32x64 each: 2 KV heads of 16), o (64x64), gate, up (128x64), down (64x128);
    # the output layer (256x64) shares the embedding's tensor and is counted once, as a Linear
    per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3
    assert llm_bench.linear_bytes(model) == 4 * (2 * per_layer + 256 * 64)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    quantize_(layer, Int8WeightOnlyConfig())
    # int8 codes, and per output row an fp32 scale and an int8 zero point (torchao 0.18's Int8Tensor holds all three)
    assert llm_bench.linear_bytes(layer) == 64 * 32 + 4 * 32 + 32


def _builder_unpack(tensor: torch.Tensor, bits: int, transpose: bool) -> torch.Tensor:
    """ONNX Runtime GenAI's model builder's own unpacking of a GPTQ tensor (an independent implementation)."""
    from onnxruntime_genai.models.loaders.base import QuantizedModel

    return QuantizedModel.unpack_on_row_for_2_4_8_bits(None, tensor, bits, transpose)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_checkpoint_layout_is_what_the_builder_reads(symmetric, bits):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 64), torch.randn(256, 64)
    entry = gptq_quantize(weight, 2 * x.T @ x / 256, bits, 16, symmetric)
    packed = gptq_checkpoint_tensors(entry, bits, symmetric)
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (64 * bits // 32, 48)
    assert packed["qzeros"].shape == (4, 48 * bits // 32) and packed["scales"].shape == (4, 48)
    codes = _builder_unpack(packed["qweight"], bits, transpose=True)  # (in, out)
    zeros = (_builder_unpack(packed["qzeros"], bits, transpose=False) + 1) % 2**bits  # the builder adds the 1 back
    offset = 2 ** (bits - 1) if symmetric else 0
    assert torch.equal(codes.T, entry["codes"] + offset) and torch.equal(zeros.T, entry["zero_point"] + offset)
    scales = packed["scales"].float()[packed["g_idx"].long()]  # (in, out)
    dequantized = ((codes - zeros[packed["g_idx"].long()]) * scales).T
    torch.testing.assert_close(dequantized, entry["weight"], rtol=1e-3, atol=1e-4)  # fp16 scales


@settings(max_examples=30)
@given(st.integers(0, 2**31), st.sampled_from([2, 4, 8]))
def test_gptq_packing_round_trips(seed, bits):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (16, 32), generator=generator)
    entry = {"codes": codes, "scale": torch.rand(16, 2, generator=generator) + 0.1,
             "zero_point": torch.randint(0, 2**bits, (16, 2), generator=generator)}
    packed = gptq_checkpoint_tensors(entry, bits)
    assert torch.equal(_builder_unpack(packed["qweight"], bits, transpose=True).T, codes)
    assert torch.equal((_builder_unpack(packed["qzeros"], bits, False) + 1).T % 2**bits, entry["zero_point"])


def test_gptq_checkpoint_errors():
    entry = rtn_quantize(torch.randn(16, 32), 4, 16)
    with pytest.raises(TypeError, match="codes"):
        gptq_checkpoint_tensors({"codes": 1}, 4)
    with pytest.raises(ValueError, match="divide 32"):
        gptq_checkpoint_tensors(entry, 3)
    with pytest.raises(ValueError, match="grid"):
        gptq_checkpoint_tensors({**entry, "codes": entry["codes"] + 16}, 4)
    with pytest.raises(ValueError, match="one grid per row"):
        gptq_checkpoint_tensors({**entry, "scale": entry["scale"][:, :1]}, 4)
    with pytest.raises(ValueError, match="multiples of 8"):
        gptq_checkpoint_tensors(rtn_quantize(torch.randn(12, 32), 4, 16), 4)
