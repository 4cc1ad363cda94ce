"""lightlm.artefacts.quantized_lm: chapter 10's table of SmolLM2 perplexities after weight-only quantization. The
layer-by-layer GPTQ driver is checked against gptq_sequential on a whole tiny Llama, every other variant against
the format it names, the byte counts against the storage they describe; the cached table (if warm) against
chapter 8's cache and against the fact that SmolLM2 ships as Q4_1."""

import copy
import math

import pytest
import torch

from lightlm import artefacts, quant_formats, quant_gptq
from lightlm.artefacts import lm_cache, quantized_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _linears(model):
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name != "lm_head"}


def test_layer_by_layer_gptq_equals_gptq_sequential_on_the_whole_model():
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    stored = quant_gptq.gptq_sequential(reference, [{"input_ids": ids, "use_cache": False}], 3, 64)
    total = quantized_lm.quantize_lm(model, "gptq-int3-g64", ids)
    for name, module in _linears(model).items():
        torch.testing.assert_close(module.weight, reference.get_submodule(name).weight, msg=name)
    # codes at 3 bits, fp16 scales, zero points at 3 bits (whole bytes per tensor)
    assert total == sum(math.ceil(e["codes"].numel() * 3 / 8) + 2 * e["scale"].numel()
                        + math.ceil(e["zero_point"].numel() * 3 / 8) for e in stored.values())


@pytest.mark.parametrize("variant", ["int8", "int4-g64", "nf4", "q4_0", "q4_1", "q8_0"])
def test_each_variant_stores_what_its_format_decodes_to(variant):
    model, dense = _tiny_llama(), _tiny_llama()
    head = model.lm_head.weight.detach().clone()
    total = quantized_lm.quantize_lm(model, variant)
    method, bits, group = quantized_lm.VARIANTS[variant]
    expected_bytes = 0
    for name, module in _linears(dense).items():
        weight = module.weight.detach()
        if method == "rtn":
            expected = quant_gptq.rtn_quantize(weight, bits, group)["weight"]
            expected_bytes += weight.numel() * bits // 8 + 2 * weight.numel() // (group or weight.shape[1]) * (
                1 + bits / 16)
        elif method == "nf4":
            stored = quant_formats.nf4_quantize(weight, 64, double_quant=True)
            expected, expected_bytes = quant_formats.nf4_dequantize(stored), expected_bytes + \
                quant_formats.nf4_nbytes(stored)
        else:
            blocks = quant_formats.gguf_quantize(weight, method)
            expected = quant_formats.gguf_dequantize(blocks, method, weight.shape)
            expected_bytes += weight.numel() // 32 * quant_formats.GGUF_KINDS[method]
        assert torch.equal(model.get_submodule(name).weight, expected), name
    assert total == pytest.approx(expected_bytes, abs=len(_linears(dense)))
    assert torch.equal(model.lm_head.weight, head)  # the tied output layer and embedding stay in float


def test_bad_variants_and_missing_calibration_raise():
    with pytest.raises(ValueError, match="variant must be one of"):
        quantized_lm.quantize_lm(_tiny_llama(), "int5")
    with pytest.raises(TypeError, match="calibration_ids must be"):
        quantized_lm.quantize_lm(_tiny_llama(), "gptq-int4")


def test_the_artefact_is_registered():
    assert "quantized-lm" in artefacts.ARTEFACTS
    assert artefacts.ARTEFACTS["quantized-lm"][1] == (quantized_lm.quantized_lm_path().name,)


def test_the_cached_table_starts_from_chapter_8s_teacher_and_q4_1_gives_the_model_back():
    from conftest import require_warm

    require_warm(quantized_lm.quantized_lm_path(), quantized_lm.quantized_lm_inputs())
    table = quantized_lm.load_quantized_lm(progress=False)
    cache = lm_cache.load_lm_cache(progress=False)
    teacher = math.exp(-cache["heldout_target_logprobs"].double().mean().item())
    assert math.isclose(table["dense"], teacher, rel_tol=1e-4)
    assert table["perplexity"]["q4_1"] == table["dense"]  # SmolLM2 ships as Q4_1: the same weights
    assert table["bytes"]["q4_1"] == table["params"] // 32 * 20
    assert table["perplexity"]["gptq-int4"] < table["perplexity"]["int4"]
    assert table["perplexity"]["gptq-int3-g64"] < table["perplexity"]["int3-g64"]
