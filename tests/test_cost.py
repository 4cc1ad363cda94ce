"""lightlm.cost against published parameter counts, torch, PEFT and torch's FLOP counter."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightlm import cost

# Published sizes: BERT-base (Devlin et al. 2019), DistilBERT (Sanh et al. 2019), GPT-2 small
# (Radford et al. 2019, as implemented by transformers), MiniLM-L6-H384 (Wang et al. 2020).
BERT_BASE = 109_482_240
DISTILBERT = 66_362_880
GPT2_SMALL = 124_439_808
MINILM_L6_H384 = 22_713_216
SMOLLM2_135M = 134_515_008


def _meta_model(model_class, config):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return model_class(config)


@pytest.mark.parametrize(
    "name, expected",
    [("bert", BERT_BASE), ("distilbert", DISTILBERT), ("gpt2", GPT2_SMALL)],
)
def test_param_count_from_config_reproduces_published_counts_and_the_real_module(name, expected):
    import transformers as tf

    config_class, model_class = {
        "bert": (tf.BertConfig, tf.BertModel),
        "distilbert": (tf.DistilBertConfig, tf.DistilBertModel),
        "gpt2": (tf.GPT2Config, tf.GPT2Model),
    }[name]
    config = config_class()  # the defaults are the base models' configurations
    assert cost.param_count_from_config(config) == expected
    assert cost.count_parameters(_meta_model(model_class, config)) == expected


def test_param_count_from_config_accepts_a_plain_dict():
    import transformers as tf

    assert cost.param_count_from_config(tf.BertConfig().to_dict()) == BERT_BASE


def test_minilm_counts_match_config_publication_and_real_weights(minilm):
    _, model = minilm
    assert cost.count_parameters(model) == MINILM_L6_H384
    assert cost.param_count_from_config(model.config) == MINILM_L6_H384


def test_llama_count_from_config_matches_real_smollm2(smollm2):
    _, model = smollm2
    assert cost.count_parameters(model) == SMOLLM2_135M  # the tied LM head is counted once
    assert cost.param_count_from_config(model.config) == SMOLLM2_135M


def test_llama_count_with_untied_head_adds_the_head():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    assert cost.param_count_from_config(config) == cost.count_parameters(_meta_model(tf.LlamaForCausalLM, config))


def test_non_embedding_count_leaves_out_the_embedding_tables(minilm):
    _, model = minilm
    c = model.config
    tables = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * c.hidden_size
    assert cost.count_parameters(model, non_embedding=True) == MINILM_L6_H384 - tables


def test_parameter_groups_partition_minilm_by_hand_count(minilm):
    _, model = minilm
    groups = cost.parameter_groups(model)
    assert sum(groups.values()) == MINILM_L6_H384
    d, ffn, layers = 384, 1536, 6
    assert groups["embeddings"] == (30522 + 512 + 2) * d
    assert groups["attention"] == layers * 4 * (d * d + d)
    assert groups["mlp"] == layers * (2 * d * ffn + ffn + d)
    assert groups["norms"] == 2 * d * (2 * layers + 1)
    assert groups["other"] == d * d + d  # the pooler


def test_parameter_groups_count_a_tied_head_once(smollm2):
    _, model = smollm2
    groups = cost.parameter_groups(model)
    assert sum(groups.values()) == SMOLLM2_135M
    assert groups["embeddings"] == 49152 * 576 and groups["other"] == 0


def test_trainable_only_counts_parameters_that_require_grad():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3))
    model[0].requires_grad_(False)
    assert cost.count_parameters(model) == 10 * 20 + 20 + 20 * 3 + 3
    assert cost.count_parameters(model, trainable_only=True) == 20 * 3 + 3
    assert cost.parameter_report(model) == {"total": 283, "trainable": 63, "non_embedding": 283}


def test_tied_weights_are_counted_once():
    embedding = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    assert cost.count_parameters(model) == 800
    assert cost.count_parameters(model, non_embedding=True) == 0


def test_lora_param_count_equals_peft_trainable_parameters(minilm):
    import copy

    from peft import LoraConfig, get_peft_model

    _, model = minilm
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    d = model.config.hidden_size
    assert cost.lora_param_count(d, d, 8, n_matrices=2 * model.config.num_hidden_layers) == trainable == 73_728


def test_bytes_per_param_agrees_with_torch_element_size():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8):
        assert cost.bytes_per_param(dtype) == torch.empty(0, dtype=dtype).element_size()
    assert cost.bytes_per_param("fp16") == cost.bytes_per_param("bfloat16") == 2
    assert cost.bytes_per_param("int4") == cost.bytes_per_param("nf4") == 0.5
    assert cost.bytes_per_param("torch.float32") == 4


def test_model_size_bytes_follows_the_dtype(minilm):
    import copy

    _, model = minilm
    n = cost.count_parameters(model)
    assert cost.model_size_bytes(model, include_buffers=False) == 4 * n
    assert cost.model_size_bytes(copy.deepcopy(model).half(), include_buffers=False) == 2 * n
    assert cost.model_size_bytes(model) > 4 * n  # position-id buffers


def test_memory_table_gives_the_familiar_numbers():
    table = cost.memory_table()
    assert table["7B"]["fp16"] == pytest.approx(14.0)
    assert table["70B"]["fp32"] == pytest.approx(280.0)
    assert table["70B"]["int4"] == pytest.approx(35.0)
    assert table["1B"]["int8"] == pytest.approx(1.0)
    assert cost.format_bytes(14e9) == "14.00 GB" and cost.format_bytes(512) == "512 B"


@pytest.mark.parametrize("batch, seq", [(2, 16), (1, 40)])
def test_flops_per_token_matches_torch_flop_counter_on_minilm(minilm, batch, seq):
    import copy

    tokenizer, model = minilm
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")  # the CPU SDPA kernel has no FLOP formula registered in torch
    inputs = tokenizer(["a film about distillation"] * batch, padding="max_length", max_length=seq, return_tensors="pt")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    c = model.config
    per_token = cost.flops_per_token(cost.matmul_params(model.encoder), c.num_hidden_layers, seq, c.hidden_size)
    pooler = 2 * cost.matmul_params(model.pooler)  # the pooler sees one token per sequence
    assert counter.get_total_flops() == batch * seq * per_token + batch * pooler


def test_flops_per_token_matches_torch_flop_counter_on_smollm2(smollm2):
    import copy

    _, model = smollm2
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    batch, seq = 2, 16
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(100, 1000, (batch, seq)))
    c = model.config
    d_attn = c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    # grouped-query attention shares K/V heads, but every query head still scores every key
    per_token = cost.flops_per_token(cost.matmul_params(model), c.num_hidden_layers, seq, d_attn)
    assert counter.get_total_flops() == batch * seq * per_token


def test_model_size_bytes_counts_every_tensor_on_the_meta_device():
    with torch.device("meta"):  # no memory: every meta tensor has data_ptr() == 0
        model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 1000))
    expected = 2 * (1000 * 1000 + 1000) * 4  # two fp32 weights and biases: 8,008,000 bytes
    assert expected == 8_008_000
    assert cost.model_size_bytes(model) == expected


def test_model_size_bytes_counts_a_tied_weight_once_on_meta_and_on_cpu():
    for device in ("meta", "cpu"):
        with torch.device(device):
            embedding, head = nn.Embedding(100, 8), nn.Linear(8, 100, bias=False)
        head.weight = embedding.weight
        assert cost.model_size_bytes(nn.ModuleDict({"e": embedding, "h": head})) == 100 * 8 * 4


SUB_BYTE = [(f"{sign}int{bits}", bits) for sign in ("u", "") for bits in range(1, 8)]


@pytest.mark.parametrize("name, bits", SUB_BYTE, ids=[name for name, _ in SUB_BYTE])
def test_bytes_per_param_of_sub_byte_dtypes_is_their_bits_over_8_as_a_dtype_and_as_a_name(name, bits):
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no torch.{name}")
    assert cost.bytes_per_param(dtype) == cost.bytes_per_param(name) == cost.bytes_per_param(str(dtype)) == bits / 8


def test_bytes_per_param_of_int4_is_one_answer_for_every_spelling():
    assert cost.bytes_per_param(torch.uint4) == cost.bytes_per_param("int4") == cost.bytes_per_param("uint4") == 0.5


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="torch has no float4_e2m1fn_x2")
def test_bytes_per_param_of_packed_fp4_counts_two_values_per_byte():
    assert torch.empty(1, dtype=torch.float4_e2m1fn_x2).element_size() == 1  # one element = two fp4 values
    assert cost.bytes_per_param(torch.float4_e2m1fn_x2) == cost.bytes_per_param("fp4") == 0.5


def test_bytes_per_param_knows_torch_dtype_names_beyond_the_table():
    for dtype in (torch.float8_e4m3fn, torch.int16, torch.int32, torch.uint16):
        assert cost.bytes_per_param(str(dtype)) == cost.bytes_per_param(dtype) == dtype.itemsize


@pytest.mark.parametrize("attention_bias, mlp_bias", [(True, False), (False, True), (True, True)])
def test_llama_count_from_config_counts_the_bias_flags(attention_bias, mlp_bias):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attention_bias=attention_bias,
                            mlp_bias=mlp_bias)
    expected = cost.count_parameters(_meta_model(tf.LlamaForCausalLM, config))
    assert cost.param_count_from_config(config) == expected
    assert cost.param_count_from_config(config.to_dict()) == expected


def test_cost_still_offers_the_timing_helpers_that_moved_to_bench():
    from lightlm import bench

    assert cost.benchmark is bench.benchmark and cost.peak_memory is bench.peak_memory
    assert cost.Timing is bench.Timing
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        cost.nonexistent


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: cost.count_parameters("not a model"), TypeError, "model must be a torch.nn.Module, got str"),
        (lambda: cost.count_parameters(nn.Linear(2, 2), trainable_only=1), TypeError, "trainable_only must be True"),
        (lambda: cost.param_count_from_config({"model_type": "t5"}), ValueError, "supported: bert, distilbert"),
        (lambda: cost.param_count_from_config({"model_type": "bert"}), ValueError, "none of the fields"),
        (lambda: cost.param_count_from_config("bert"), TypeError, "config must be a transformers config or a dict"),
        (lambda: cost.lora_param_count(384, 384, 0), ValueError, "r must be >= 1, got 0"),
        (lambda: cost.lora_param_count(384, 384, 500), ValueError, "exceeds min"),
        (lambda: cost.lora_param_count(384.0, 384, 8), TypeError, "d_in must be an int, got float"),
        (lambda: cost.lora_param_count(384, 384, True), TypeError, "r must be an int, got bool"),
        (lambda: cost.bytes_per_param("int9"), ValueError, "unknown dtype 'int9'; known: .*int4"),
        (lambda: cost.bytes_per_param(4), TypeError, "dtype must be a torch.dtype or a name"),
        (lambda: cost.bytes_per_param(torch.bool), ValueError, "not a parameter dtype"),
        (lambda: cost.bytes_per_param(torch.complex64), ValueError, "not a parameter dtype"),
        (lambda: cost.weight_memory(-1, "fp16"), ValueError, "n_params must be >= 0, got -1"),
        (lambda: cost.weight_memory("7B", "fp16"), TypeError, "n_params must be a real number, got str"),
        (lambda: cost.weight_memory(float("nan"), "fp16"), ValueError, "n_params must be a number, got nan"),
        (lambda: cost.memory_table(dtypes="fp16"), TypeError, "dtypes must be a tuple or list"),
        (lambda: cost.memory_table(sizes=[7e9]), TypeError, "sizes must be a dict"),
        (lambda: cost.memory_table(dtypes=("fp5",)), ValueError, "unknown dtype 'fp5'"),
        (lambda: cost.model_size_bytes(nn.Linear(2, 2), include_buffers="yes"), TypeError, "include_buffers"),
        (lambda: cost.flops_per_token(-5), ValueError, "n_matmul_params must be >= 0, got -5"),
        (lambda: cost.flops_per_token(10, context=1.5), TypeError, "context must be an int, got float"),
        (lambda: cost.format_bytes(-1), ValueError, "n_bytes must be >= 0, got -1"),
        (lambda: cost.format_bytes(float("nan")), ValueError, "n_bytes must be a number, got nan"),
        (lambda: cost.format_bytes(float("inf")), ValueError, "n_bytes must be finite"),
        (lambda: cost.format_bytes("1 GB"), TypeError, "n_bytes must be a real number, got str"),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
