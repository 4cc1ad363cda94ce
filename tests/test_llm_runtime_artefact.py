"""lightlm.artefacts.llm_runtime: chapter 14's exports of SmolLM2 for ONNX Runtime GenAI. The GPTQ checkpoint
writer on a tiny Llama goes through the real model builder and must come back as the weights it wrote; the cached
exports (if warm) against the eager model's own logits and perplexity, chapter 10's table and the export checks."""

import json
import string

import onnx
import pytest
import torch
from onnx import numpy_helper

from lightlm import deploy_llm, llm_bench
from lightlm.artefacts import llm_runtime, lm_cache, quantized_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def _matmulnbits_weight(graph, initializers, node) -> torch.Tensor:
    """De-quantize one MatMulNBits node: (N, K) from its packed codes, scales and (4-bit) zero points."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    packed, scales = (torch.from_numpy(numpy_helper.to_array(initializers[name]).copy()) for name in node.input[1:3])
    n, blocks = attrs["N"], packed.shape[1]
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(n, -1).float()
    if len(node.input) > 3:
        zeros = torch.from_numpy(numpy_helper.to_array(initializers[node.input[3]]).copy())
        zeros = torch.stack([zeros & 15, zeros >> 4], -1).reshape(n, -1)[:, :blocks].float()
    else:
        zeros = torch.full((n, blocks), 8.0)
    block = attrs["block_size"]
    return (codes - zeros.repeat_interleave(block, 1)) * scales.reshape(n, blocks).repeat_interleave(block, 1)


def test_a_gptq_checkpoint_goes_through_the_builder_unchanged(tmp_path, monkeypatch):
    """Write a tiny Llama as a GPTQ checkpoint (RTN codes on the artefact's grid), export it with the real model
    builder, and read the int4 weights back out of the ONNX graph: they must be the weights that were written."""
    model = _tiny_llama()
    source = tmp_path / "source"
    model.save_pretrained(source)
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index + 3 for index, char in enumerate(string.printable)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(source)
    monkeypatch.setitem(llm_runtime.SETTINGS, "gptq", {**llm_runtime.SETTINGS["gptq"], "group_size": 32})
    llm_runtime._gptq_checkpoint(model, source, None, tmp_path / "checkpoint", "rtn")
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                             "sym": False}
    exported = deploy_llm.export_llm(tmp_path / "checkpoint", tmp_path / "export", "int4", reference=model)
    graph = onnx.load(str(exported.path / "model.onnx"))
    initializers = {t.name: t for t in graph.graph.initializer}
    layer = model.model.layers[1]
    nodes = {n.name: n for n in graph.graph.node if n.op_type == "MatMulNBits"}
    down = next(node for name, node in nodes.items() if "layers.1/mlp/down_proj" in name)
    torch.testing.assert_close(_matmulnbits_weight(graph, initializers, down), layer.mlp.down_proj.weight,
                               rtol=1e-3, atol=1e-4)  # fp16 scales
    qkv = next(node for name, node in nodes.items() if "layers.1/attn/qkv_proj" in name)
    stacked = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
    torch.testing.assert_close(_matmulnbits_weight(graph, initializers, qkv), stacked, rtol=1e-3, atol=1e-4)


def test_registered_after_what_it_reads():
    from lightlm import artefacts

    order = list(artefacts.ARTEFACTS)
    assert artefacts.ARTEFACTS["llm-runtime"][1] == (llm_runtime.llm_runtime_path().name,)
    assert order.index("llm-runtime") > max(order.index("smollm2"), order.index("lm-cache"))


def test_eager_variant_refuses_unknown_rows():
    with pytest.raises(ValueError, match="eager fp32"):
        llm_runtime.eager_variant(torch.nn.Linear(2, 2), "eager fp16")


@pytest.fixture(scope="module")
def runtime():
    from conftest import require_warm

    require_warm(llm_runtime.llm_runtime_path(), llm_runtime.llm_runtime_inputs())
    return llm_runtime.load_llm_runtime(progress=False)


def test_cached_exports_agree_with_the_eager_model(runtime, smollm2):
    _, model = smollm2
    windows = lm_cache.load_lm_cache(progress=False)["heldout_ids"][:2].long()
    with torch.no_grad():
        expected = model(input_ids=windows).logits
    torch.testing.assert_close(runtime["exports"]["fp32"].logits(windows), expected, atol=1e-3, rtol=1e-4)
    table = quantized_lm.load_quantized_lm(progress=False)  # chapter 10's perplexity of the same model
    # the same windows and model; the two sums differ in float rounding only (fp32 vs float64 log-softmax, batches)
    assert runtime["perplexity"]["eager fp32"] == pytest.approx(table["dense"], rel=1e-5)
    assert runtime["perplexity"]["runtime fp32"] == pytest.approx(table["dense"], rel=1e-5)
    for name, check in runtime["checks"].items():
        assert check["top1"] >= check["bounds"]["min_top1"] and check["kl"] <= check["bounds"]["max_kl"], name
    assert runtime["checks"]["runtime fp32"]["max_abs"] <= 1e-3
    assert runtime["top1"]["eager fp32"] == runtime["top1"]["runtime fp32"] == 1.0


def test_the_gptq_export_holds_an_asymmetric_grid_in_groups_of_64(runtime):
    graph = onnx.load(str(runtime["exports"]["gptq-int4-g64"].path / "model.onnx"), load_external_data=False)
    layers = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and "/layers." in n.name]
    blocks = {onnx.helper.get_attribute_value(a) for n in layers for a in n.attribute if a.name == "block_size"}
    assert len(layers) == 5 * 30 and blocks == {64} and all(len(n.input) == 4 for n in layers)  # zero points
    assert runtime["perplexity"]["runtime int4 GPTQ g64"] < runtime["perplexity"]["runtime int4 RTN g64"]


def test_bytes_match_the_models_they_describe(runtime, smollm2):
    _, model = smollm2
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    # every Linear, the output layer (tied: the embedding's one table) included, at 4 bytes; only the norms are not
    assert runtime["bytes"]["eager fp32"] == 4 * (sum(p.numel() for p in model.parameters()) - norms)
    assert runtime["bytes"]["eager bf16"] == runtime["bytes"]["eager fp32"] // 2
    for folder, row in (("fp32", "runtime fp32"), ("int4", "runtime int4"), ("gptq-int4-g64", "runtime int4 GPTQ g64")):
        assert runtime["bytes"][row] == runtime["exports"][folder].nbytes
    assert llm_bench.linear_bytes(model) == runtime["bytes"]["eager fp32"]
