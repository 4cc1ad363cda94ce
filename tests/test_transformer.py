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


def test_from_hf_bert_takes_the_layers_head_count_and_rejects_another(minilm):
    _, model = minilm
    layer, heads = model.encoder.layer[0], model.config.num_attention_heads
    assert TransformerBlock.from_hf_bert(layer).attention.n_heads == heads
    with pytest.raises(ValueError, match=f"n_heads={heads + 2} but the BERT layer has num_attention_heads={heads}"):
        TransformerBlock.from_hf_bert(layer, n_heads=heads + 2)
    with pytest.raises(TypeError, match="expected a Hugging Face BertLayer"):
        TransformerBlock.from_hf_bert(nn.Linear(4, 4))


def test_pad_token_id_is_the_embeddings_padding_idx_and_changes_no_other_initial_weight():
    torch.manual_seed(0)
    plain = EncoderClassifier(TransformerConfig(vocab_size=20, d_model=16, n_heads=2))
    torch.manual_seed(0)
    padded = EncoderClassifier(TransformerConfig(vocab_size=20, d_model=16, n_heads=2, pad_token_id=3))
    embedding = padded.backbone.token_embedding
    assert plain.backbone.token_embedding.padding_idx is None and embedding.padding_idx == 3
    assert (embedding.weight[3] == 0).all()
    rows = torch.arange(20) != 3
    torch.testing.assert_close(embedding.weight[rows], plain.backbone.token_embedding.weight[rows], rtol=0, atol=0)
    for (name, ours), (_, theirs) in zip(padded.named_parameters(), plain.named_parameters()):
        if name != "backbone.token_embedding.weight":
            assert torch.equal(ours, theirs), name
    reference = nn.Embedding(20, 16, padding_idx=3)  # torch's own padding_idx: no gradient for that row
    ids = torch.tensor([[1, 3, 5, 3]])
    padded(ids).sum().backward()
    reference(ids).sum().backward()
    assert (embedding.weight.grad[3] == 0).all() and (reference.weight.grad[3] == 0).all()
    assert (embedding.weight.grad[[1, 5]] != 0).any()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"vocab_size": 0}, ValueError, "vocab_size must be >= 1, got 0"),
        ({"vocab_size": "10"}, TypeError, "vocab_size must be an int, got str"),
        ({"vocab_size": 10, "n_layers": True}, TypeError, "n_layers must be an int, got bool"),
        ({"vocab_size": 10, "d_model": 30, "n_heads": 4}, ValueError, "d_model=30 must be divisible by n_heads=4"),
        ({"vocab_size": 10, "dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"vocab_size": 10, "dropout": "0.1"}, TypeError, "dropout must be a real number, got str"),
        ({"vocab_size": 10, "pad_token_id": 10}, ValueError, r"pad_token_id must be in \[0, 9\], got 10"),
        ({"vocab_size": 10, "pad_token_id": 1.0}, TypeError, "pad_token_id must be an int, got float"),
        ({"vocab_size": 10, "d_ff": 0}, ValueError, "d_ff must be >= 1, got 0"),
        ({"vocab_size": 10, "d_ff": True}, TypeError, "d_ff must be an int, got bool"),
        ({"vocab_size": 10, "norm_first": 1}, TypeError, "norm_first must be True or False, got int"),
        ({"vocab_size": 10, "layer_norm_eps": 0.0}, ValueError, "layer_norm_eps must be > 0, got 0.0"),
        ({"vocab_size": 10, "layer_norm_eps": None}, TypeError, "layer_norm_eps must be a real number"),
    ],
)
def test_config_rejects_bad_sizes(kwargs, error, message):
    with pytest.raises(error, match=message):
        TransformerConfig(**kwargs)


_MODEL = CausalLM(TransformerConfig(vocab_size=10, d_model=16, n_heads=2, max_len=8))
_START = torch.zeros(1, 1, dtype=torch.long)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: _MODEL(torch.zeros(1, 9, dtype=torch.long)), ValueError, "exceeds max_len=8"),
        (lambda: _MODEL(torch.zeros(1, 4)), TypeError, "input_ids must be an integer tensor, got dtype torch.float32"),
        (lambda: _MODEL([[1, 2]]), TypeError, "input_ids must be a torch.Tensor, got list"),
        (lambda: _MODEL(torch.zeros(4, dtype=torch.long)), ValueError, r"shape \(batch, seq\)"),
        (lambda: _MODEL(torch.tensor([[1, 10]])), ValueError,
         r"token ids must be in \[0, vocab_size=10\), got .*\[1, 10\]"),
        (lambda: _MODEL(torch.tensor([[-1, 2]])), ValueError, "token ids must be in"),
        (lambda: _MODEL(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5)), ValueError, "attention_mask"),
        (lambda: _MODEL(torch.zeros(1, 4, dtype=torch.long), [[1, 1, 1, 1]]), TypeError,
         "attention_mask must be a torch.Tensor"),
        (lambda: _MODEL.generate(_START, 2, top_k=11), ValueError, r"top_k must be in \[1, 10\], got 11"),
        (lambda: _MODEL.generate(_START, 2, top_k=2.0), TypeError, "top_k must be an int, got float"),
        (lambda: _MODEL.generate(_START, 2, top_k=True), TypeError, "top_k must be an int, got bool"),
        (lambda: _MODEL.generate(_START, 2, temperature=-1.0), ValueError, "temperature must be >= 0, got -1.0"),
        (lambda: _MODEL.generate(_START, 2, temperature="hot"), TypeError, "temperature must be a real number"),
        (lambda: _MODEL.generate(_START, 2, temperature=float("nan")), ValueError, "temperature must be a number"),
        (lambda: _MODEL.generate(_START, 2.0), TypeError, "max_new_tokens must be an int, got float"),
        (lambda: _MODEL.generate(_START, -1), ValueError, "max_new_tokens must be >= 0"),
        (lambda: _MODEL.generate([[0]], 2), TypeError, "input_ids must be a torch.Tensor"),
        (lambda: _MODEL.generate(torch.tensor([[12]]), 2), ValueError, "token ids must be in"),
        (lambda: _MODEL.generate(_START, 2, generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_forward_and_generate_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
