"""lightlm.transformer against Hugging Face BERT and torch.nn.TransformerEncoderLayer."""

import pytest
import torch
from torch import nn

from lightlm import attention
from lightlm.transformer import CausalLM, EncoderClassifier, TransformerBlock, TransformerConfig

SENTENCES = ["The acting was not good, but the soundtrack was wonderful.", "Dull.", "A small, moving film."]


@pytest.fixture(scope="module")
def bert_states(minilm):
    tokenizer, model = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return batch, out.hidden_states


def test_post_ln_block_reproduces_a_real_bert_layer(minilm, bert_states):
    _, model = minilm
    batch, states = bert_states
    block = TransformerBlock.from_hf_bert(model.encoder.layer[0], n_heads=model.config.num_attention_heads)
    with torch.no_grad():
        ours, _ = block(states[0], mask=attention.padding_mask(batch["attention_mask"]))
    torch.testing.assert_close(ours, states[1], rtol=1e-5, atol=1e-5)


def test_six_loaded_blocks_reproduce_the_minilm_encoder(minilm, bert_states):
    _, model = minilm
    batch, states = bert_states
    mask = attention.padding_mask(batch["attention_mask"])
    x = states[0]
    with torch.no_grad():
        for layer in model.encoder.layer:
            x, _ = TransformerBlock.from_hf_bert(layer, n_heads=model.config.num_attention_heads)(x, mask=mask)
    torch.testing.assert_close(x, states[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_equals_torch_transformer_encoder_layer(norm_first):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=10, d_model=32, n_heads=4, d_ff=64, norm_first=norm_first)
    ours = TransformerBlock(config).eval()
    reference = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu",
                                           layer_norm_eps=config.layer_norm_eps, batch_first=True,
                                           norm_first=norm_first).eval()
    mha = ours.attention
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        reference.self_attn.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        reference.self_attn.out_proj.load_state_dict(mha.out_proj.state_dict())
        reference.linear1.load_state_dict(ours.ffn[0].state_dict())
        reference.linear2.load_state_dict(ours.ffn[2].state_dict())
        reference.norm1.load_state_dict(ours.norm1.state_dict())
        reference.norm2.load_state_dict(ours.norm2.state_dict())
        x = torch.randn(2, 7, 32)
        keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        expected = reference(x, src_key_padding_mask=keep == 0)
        got, _ = ours(x, mask=attention.padding_mask(keep))
    valid = keep.bool()  # torch's fast path may leave padded query rows as zeros
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_encoder_classifier_ignores_padding():
    torch.manual_seed(0)
    model = EncoderClassifier(TransformerConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2)).eval()
    ids = torch.randint(1, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask), model(ids, torch.ones_like(ids)), rtol=1e-5, atol=1e-6)


def test_encoder_classifier_returns_weights_that_sum_to_one():
    model = EncoderClassifier(TransformerConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=3)).eval()
    logits, weights = model(torch.randint(1, 50, (2, 5)), need_weights=True)
    assert logits.shape == (2, 2) and len(weights) == 3 and weights[0].shape == (2, 4, 5, 5)
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(2, 4, 5))


def test_causal_lm_never_looks_at_future_tokens():
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(vocab_size=40, d_model=32, n_heads=4, n_layers=2)).eval()
    ids = torch.randint(0, 40, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 40
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])
        assert not torch.allclose(model(ids)[:, 6:], model(changed)[:, 6:])


def test_causal_lm_ties_output_and_input_embeddings():
    model = CausalLM(TransformerConfig(vocab_size=40, d_model=32, n_heads=4))
    assert model.lm_head.weight is model.backbone.token_embedding.weight


def test_causal_lm_learns_a_repeating_sequence():
    from lightlm.train import train_loop

    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(vocab_size=8, d_model=32, n_heads=4, n_layers=1, max_len=32))
    data = torch.arange(32).remainder(8).unsqueeze(0).repeat(4, 1)  # 0 1 2 ... 7 0 1 ...

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 8), batch[:, 1:].reshape(-1))

    losses = train_loop(model, [data], loss_fn, torch.optim.AdamW(model.parameters(), lr=3e-3), steps=150,
                        progress=False)
    assert losses[-1] < 0.05
    out = model.generate(torch.tensor([[3, 4]]), max_new_tokens=5, temperature=0)
    assert out.tolist() == [[3, 4, 5, 6, 7, 0, 1]]


def test_sampled_generation_is_seeded_and_top_k_limits_choices():
    model = CausalLM(TransformerConfig(vocab_size=40, d_model=32, n_heads=4))
    start = torch.zeros(1, 1, dtype=torch.long)
    first = model.generate(start, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    again = model.generate(start, 8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and first.shape == (1, 9)
    with torch.no_grad():
        best = model(start)[0, -1].argmax().item()
    assert model.generate(start, 1, temperature=5.0, top_k=1)[0, 1].item() == best


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vocab_size": 0},
        {"vocab_size": 10, "d_model": 30, "n_heads": 4},
        {"vocab_size": 10, "dropout": 1.0},
        {"vocab_size": 10, "pad_token_id": 10},
        {"vocab_size": 10, "d_ff": 0},
    ],
)
def test_config_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        TransformerConfig(**kwargs)


def test_forward_rejects_bad_input():
    model = CausalLM(TransformerConfig(vocab_size=10, d_model=16, n_heads=2, max_len=8))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=11)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=-1.0)
