"""lightlm.cost against published parameter counts, torch, PEFT and torch's FLOP counter."""

import time

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


def test_peak_memory_sees_a_large_temporary():
    def make_and_drop():
        big = torch.ones(1000, 1000)  # 4,000,000 bytes
        return big.sum().item()

    result, peak = cost.peak_memory(make_and_drop)
    assert result == 1e6
    assert 4_000_000 <= peak < 4_100_000


def test_peak_memory_counts_what_is_live_at_once():
    def sequential():
        for _ in range(3):
            x = torch.ones(250, 1000)  # 1 MB, freed before the next one is made
            del x

    def together():
        kept = [torch.ones(250, 1000) for _ in range(3)]
        return len(kept)

    assert cost.peak_memory(sequential)[1] < 1_100_000
    assert cost.peak_memory(together)[1] >= 3_000_000


def test_peak_memory_shows_naive_attention_holds_the_score_matrix():
    q = torch.randn(1, 4, 512, 32)
    scores_bytes = 4 * 512 * 512 * 4

    def naive():
        return (q @ q.transpose(-2, -1)).softmax(-1) @ q

    assert cost.peak_memory(naive)[1] >= scores_bytes
    fused = cost.peak_memory(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))[1]
    assert fused < scores_bytes


def test_benchmark_reports_median_and_ratio_of_two_callables():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.001)

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    timing = cost.benchmark(fast, baseline=slow, warmup=2, repeat=5)
    assert calls == {"fast": 7, "slow": 7}
    assert len(timing.times) == len(timing.baseline_times) == 5
    assert timing.baseline_median >= 0.02 and timing.median >= 0.001
    assert timing.ratio > 3
    assert "ratio" in str(timing)
    assert cost.benchmark(fast, repeat=1).ratio is None


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: cost.count_parameters("not a model"), TypeError),
        (lambda: cost.param_count_from_config({"model_type": "t5"}), ValueError),
        (lambda: cost.param_count_from_config({"model_type": "bert"}), ValueError),
        (lambda: cost.lora_param_count(384, 384, 0), ValueError),
        (lambda: cost.lora_param_count(384, 384, 500), ValueError),
        (lambda: cost.lora_param_count(384.0, 384, 8), TypeError),
        (lambda: cost.bytes_per_param("int3"), ValueError),
        (lambda: cost.bytes_per_param(4), TypeError),
        (lambda: cost.bytes_per_param(torch.bool), ValueError),
        (lambda: cost.weight_memory(-1, "fp16"), ValueError),
        (lambda: cost.weight_memory("7B", "fp16"), TypeError),
        (lambda: cost.flops_per_token(-5), ValueError),
        (lambda: cost.flops_per_token(10, context=1.5), TypeError),
        (lambda: cost.benchmark(lambda: None, repeat=0), ValueError),
        (lambda: cost.benchmark(lambda: None, warmup=-1), ValueError),
        (lambda: cost.benchmark("fn"), TypeError),
        (lambda: cost.format_bytes(-1), ValueError),
        (lambda: cost.peak_memory("fn"), TypeError),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error):
    with pytest.raises(error):
        call()


def test_error_messages_say_what_is_allowed():
    with pytest.raises(ValueError, match="supported: bert, distilbert, gpt2, llama"):
        cost.param_count_from_config({"model_type": "t5"})
    with pytest.raises(ValueError, match="known: .*int4"):
        cost.bytes_per_param("int3")
