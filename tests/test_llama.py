"""lightlm.llama and lightlm.llama_blocks (chapter 3) against Hugging Face's Llama, piece by piece on a small random
config, then the whole model on the real float32 SmolLM2 (slow)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightlm import llama, transformer
from lightlm.llama import KVCache, LlamaConfig, LlamaLM
from lightlm.llama_blocks import (GroupedQueryAttention, LlamaDecoderLayer, RMSNorm, SwiGLU, apply_rope,
                                  rope_frequencies)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

hf_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
             rms_norm_eps=1e-5, attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=96)
TOL = dict(rtol=1e-5, atol=1e-5)


def hf_config(**changes):
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(**{**SMALL, **changes})


def hf_model(seed=0, **changes):
    torch.manual_seed(seed)
    return hf_llama.LlamaForCausalLM(hf_config(**changes)).eval()


def right_padded(batch=3, seq=7, seed=0, vocab=97):
    """Random ids and a 0/1 mask whose rows have 7, 4 and 2 real tokens, padded on the right (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (batch, seq), generator=generator)
    lengths = torch.tensor([seq, 4, 2][:batch])
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def additive(bool_mask):
    """A bool (True = may attend) mask as Hugging Face's eager attention adds it: 0 or the dtype's minimum."""
    return torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)


def hf_rope(config, positions):
    return hf_llama.LlamaRotaryEmbedding(config)(torch.zeros(1), positions)  # (cos, sin), (batch, seq, d)


# --------------------------------------------------------------------------- the pieces against Hugging Face


def test_rmsnorm_matches_hf_llama_rmsnorm():
    theirs = hf_llama.LlamaRMSNorm(64, eps=1e-5)
    nn.init.normal_(theirs.weight)
    ours = RMSNorm(64, eps=1e-5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 64) * 3
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours(x), theirs.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())


def test_rope_matches_hf_rotary_embedding_and_apply_rotary_pos_emb():
    config = hf_config()
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])  # (batch, seq): one row shifted, as with padding
    cos, sin = rope_frequencies(16, positions, theta=500.0)
    hf_cos, hf_sin = hf_rope(config, positions)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=0)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)  # (batch, heads, seq, d); fewer key heads
    hf_q, _ = hf_llama.apply_rotary_pos_emb(q, q, hf_cos, hf_sin)
    _, hf_k = hf_llama.apply_rotary_pos_emb(k, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, rtol=0, atol=0)


def test_rope_rotates_each_pair_by_the_angle_of_its_frequency():
    """The closed form, independent of any implementation: coordinates (i, i + d/2) turn by m·theta^(-2i/d)."""
    x = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    cos, sin = rope_frequencies(8, torch.tensor([[5]]), theta=100.0, dtype=torch.float64)
    rotated = apply_rope(x, cos, sin)[0, 0, 0]
    for i in range(4):
        angle = 5 * 100.0 ** (-2 * i / 8)
        a, b = x[0, 0, 0, i].item(), x[0, 0, 0, i + 4].item()
        expected = [a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)]
        torch.testing.assert_close(rotated[[i, i + 4]], torch.tensor(expected, dtype=torch.float64))


def test_swiglu_matches_hf_llama_mlp():
    theirs = hf_llama.LlamaMLP(hf_config())
    ours = SwiGLU(64, 96)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_grouped_query_attention_matches_hf_llama_attention_with_a_causal_padded_mask():
    config = hf_config()
    torch.manual_seed(0)
    theirs = hf_llama.LlamaAttention(config, layer_idx=0).eval()
    ours = GroupedQueryAttention(64, 4, 2, 16)
    ours.load_state_dict(theirs.state_dict())
    _, attention_mask = right_padded()
    positions = torch.arange(7)[None].expand(3, 7)
    mask = torch.ones(7, 7, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]  # (3, 1, 7, 7)
    x = torch.randn(3, 7, 64)
    expected, _ = theirs(x, hf_rope(config, positions), attention_mask=additive(mask))
    torch.testing.assert_close(ours(x, *rope_frequencies(16, positions, 500.0), mask), expected, **TOL)
    causal_only = additive(torch.ones(7, 7, dtype=torch.bool).tril())[None, None]  # (1, 1, 7, 7)
    causal, _ = theirs(x, hf_rope(config, positions), attention_mask=causal_only)
    torch.testing.assert_close(ours(x, *rope_frequencies(16, positions, 500.0)), causal, **TOL)  # mask=None


def test_decoder_layer_matches_hf_llama_decoder_layer():
    config = hf_config()
    torch.manual_seed(1)
    theirs = hf_llama.LlamaDecoderLayer(config, layer_idx=0).eval()
    for norm in (theirs.input_layernorm, theirs.post_attention_layernorm):
        nn.init.normal_(norm.weight)  # not all ones, so a swapped norm would show
    ours = LlamaDecoderLayer(64, 4, 2, 16, 96, eps=1e-5)
    ours.load_state_dict(theirs.state_dict())
    _, attention_mask = right_padded()
    positions = torch.arange(7)[None].expand(3, 7)
    mask = torch.ones(7, 7, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
    x = torch.randn(3, 7, 64)
    expected = theirs(x, attention_mask=additive(mask), position_embeddings=hf_rope(config, positions))
    torch.testing.assert_close(ours(x, *rope_frequencies(16, positions, 500.0), mask), expected, **TOL)


@pytest.mark.parametrize("tied", [True, False])
def test_small_llama_lm_from_hf_reproduces_its_logits_on_a_padded_batch(tied):
    theirs = hf_model(tie_word_embeddings=tied)
    ours = LlamaLM.from_hf(theirs)
    assert ours.config.n_kv_heads == 2 and ours.config.rope_theta == 500.0 and not ours.training
    assert (ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()) == tied
    assert ours.embed_tokens.weight.data_ptr() != theirs.model.embed_tokens.weight.data_ptr()  # a copy
    ids, mask = right_padded()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, mask), expected, **TOL)


def test_kv_cache_holds_what_hf_dynamic_cache_holds_and_decode_matches_the_full_pass():
    theirs = hf_model()
    ours = LlamaLM.from_hf(theirs)
    ids, _ = right_padded(batch=2, seq=7)
    with torch.no_grad():
        out = theirs(input_ids=ids[:, :6], use_cache=True)
        logits, cache = ours(ids[:, :6], cache=KVCache())  # prefill
        for layer, hf_layer in enumerate(out.past_key_values.layers):
            torch.testing.assert_close(cache.keys[layer], hf_layer.keys, **TOL)  # (batch, kv_heads, 6, d)
            torch.testing.assert_close(cache.values[layer], hf_layer.values, **TOL)
        assert cache.seq_len == 6 and cache.keys[0].shape == (2, 2, 6, 16)
        assert cache.nbytes() == 2 * 2 * (2 * 2 * 6 * 16) * 4  # K and V, 2 layers, float32
        step, cache = ours(ids[:, 6:], cache=cache)  # decode: one position against the cache
        full = theirs(input_ids=ids).logits
    torch.testing.assert_close(logits, full[:, :6], **TOL)
    torch.testing.assert_close(step, full[:, 6:], **TOL)


def test_generate_with_and_without_cache_equals_hf_generate_on_a_left_padded_batch():
    theirs = hf_model(seed=3)
    ours = LlamaLM.from_hf(theirs)
    ids, mask = right_padded(batch=2, seq=6, seed=2)
    ids, mask = ids.flip(1), mask.flip(1)  # left padding, as for generation
    expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    cached = ours.generate(ids, 8, attention_mask=mask)
    uncached = ours.generate(ids, 8, attention_mask=mask, use_cache=False)
    assert expected.shape == (2, 14)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)


def test_transformer_re_exports_llama_lm():
    assert transformer.LlamaLM is llama.LlamaLM


# --------------------------------------------------------------------------- properties


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 4000), n=st.integers(0, 4000),
       shift=st.integers(-2000, 2000), half_dim=st.integers(1, 32))
def test_rope_preserves_norms_and_q_dot_k_depends_only_on_the_offset(seed, m, n, shift, half_dim):
    d = 2 * half_dim
    generator = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 1, d, dtype=torch.float64, generator=generator).unbind(0)

    def at(x, position):
        cos, sin = rope_frequencies(d, torch.tensor([[position]]), theta=10000.0, dtype=torch.float64)
        return apply_rope(x, cos, sin)

    torch.testing.assert_close(at(q, m).norm(), q.norm())  # a rotation keeps lengths
    m2, n2 = max(m + shift, 0), max(n + shift, 0)
    if m2 - n2 == m - n:  # the same offset: (R_m q)·(R_n k) = q·R_{n-m} k
        torch.testing.assert_close((at(q, m) * at(k, n)).sum(), (at(q, m2) * at(k, n2)).sum())


# --------------------------------------------------------------------------- bad input


def test_from_hf_rejects_a_model_that_is_not_llama_and_unsupported_configs():
    with pytest.raises(TypeError, match="hf_model must be a transformers LlamaForCausalLM, got Linear"):
        LlamaLM.from_hf(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        LlamaLM.from_hf("SmolLM2")
    scaled = hf_model(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope scaling of type 'linear' is not implemented"):
        LlamaLM.from_hf(scaled)
    with pytest.raises(ValueError, match="attention_bias=True is not supported"):
        LlamaLM.from_hf(hf_model(attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        LlamaLM.from_hf(hf_model(hidden_act="gelu"))


def test_config_and_pieces_reject_bad_sizes():
    with pytest.raises(ValueError, match="n_heads=4 must be a multiple of n_kv_heads=3"):
        LlamaConfig(vocab_size=10, n_heads=4, n_kv_heads=3)
    with pytest.raises(TypeError, match="n_layers must be an int, got float"):
        LlamaConfig(vocab_size=10, n_layers=2.0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_frequencies(7, torch.arange(3))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rope_frequencies(8, torch.arange(3.0))
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        rope_frequencies(8, torch.arange(3), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"cos must end in \(seq, head_dim\)"):
        apply_rope(torch.randn(1, 2, 3, 8), *rope_frequencies(8, torch.arange(4)))
    with pytest.raises(ValueError, match="x must end in d_model=8"):
        RMSNorm(8)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="LlamaConfig"):
        LlamaLM({"vocab_size": 10})


def test_forward_and_generate_reject_bad_inputs():
    model = LlamaLM(LlamaConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=24)).eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"ids in \[0, 11\)"):
        model(torch.tensor([[1, 11]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, cached \+ seq\) = \(1, 3\)"):
        model(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(TypeError, match="cache must be a lightlm.llama.KVCache or None, got dict"):
        model(ids, cache={})
    with pytest.raises(ValueError, match=r"position_ids must be \(batch or 1, 3\)"):
        model(ids, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        model.generate(ids, -1)
    with pytest.raises(TypeError, match="use_cache must be True or False, got str"):
        model.generate(ids, 2, use_cache="yes")
    with pytest.raises(ValueError, match=r"attention_mask \(1, 2\) must match input_ids \(1, 3\)"):
        model.generate(ids, 2, attention_mask=torch.ones(1, 2, dtype=torch.long))
    _, cache = model(ids, cache=KVCache())
    with pytest.raises(ValueError, match="the cache holds batch 1, input_ids has batch 2"):
        model(torch.tensor([[1], [2]]), cache=cache)


# --------------------------------------------------------------------------- the real SmolLM2 (slow)

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there"]


@pytest.fixture(scope="module")
def smollm2_copy(smollm2):
    tokenizer, model = smollm2
    return tokenizer, model, LlamaLM.from_hf(model)


def test_llama_lm_reproduces_smollm2_logits_on_a_padded_batch(smollm2_copy):
    tokenizer, model, ours = smollm2_copy
    assert (ours.config.n_layers, ours.config.n_heads, ours.config.n_kv_heads, ours.config.d_ff) == (30, 9, 3, 1536)
    assert ours.config.rope_theta == 100000.0 and ours.config.tie_word_embeddings
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        expected = model(**batch).logits
        logits = ours(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()  # padding positions' logits are not defined by either model
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[real].argmax(-1), expected[real].argmax(-1))


def test_greedy_generate_with_and_without_cache_equals_smollm2_generate(smollm2_copy):
    tokenizer, model, ours = smollm2_copy
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    expected = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert expected.shape[1] == batch["input_ids"].shape[1] + 6  # no sequence stopped early at the EOS token
    assert (expected[:, -6:] != tokenizer.eos_token_id).all()  # nor was padded after one (ours never stops)
    cached = ours.generate(batch["input_ids"], 6, attention_mask=batch["attention_mask"])
    uncached = ours.generate(batch["input_ids"], 6, attention_mask=batch["attention_mask"], use_cache=False)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
