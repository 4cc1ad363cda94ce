"""lightlm.attention against torch's scaled_dot_product_attention, torch's MultiheadAttention and a real BERT
layer (MiniLM), plus the memory claim of tiled attention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightlm.attention import (
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    tiled_attention,
)

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
MASK_KINDS = ["no mask", "bool mask", "padding mask", "float mask", "causal", "custom scale", "cross-attention",
              "cross-attention causal"]
SENTENCES = [
    "Attention is all you need.",
    "A short one.",
    "Distillation moves what a large teacher knows into a small student that is cheap to run.",
]


def _qkv(n_queries=12, n_keys=12, dtype=torch.float32, batch=2, heads=3, d_k=16, d_v=8, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return randn(batch, heads, n_queries, d_k), randn(batch, heads, n_keys, d_k), randn(batch, heads, n_keys, d_v)


def _case(kind, n_queries, n_keys, dtype, seed=1):
    """(q, k, v, our keyword arguments, torch's keyword arguments) for one kind of mask."""
    if kind.startswith("cross-attention"):
        n_keys = n_keys + 7 if n_keys == n_queries else n_keys
    q, k, v = _qkv(n_queries, n_keys, dtype)
    generator = torch.Generator().manual_seed(seed)
    if kind == "bool mask":
        mask = torch.rand(2, 1, n_queries, n_keys, generator=generator) > 0.4
        mask[..., 0] = True  # no fully masked row here: those have their own test
        return q, k, v, dict(attn_mask=mask), dict(attn_mask=mask)
    if kind == "padding mask":
        lengths = torch.tensor([n_keys, n_keys // 2])
        mask = padding_mask((torch.arange(n_keys) < lengths[:, None]).long())  # (batch, 1, 1, S)
        return q, k, v, dict(attn_mask=mask), dict(attn_mask=mask)
    if kind == "float mask":
        mask = 2 * torch.randn(n_queries, n_keys, generator=generator, dtype=dtype)
        mask[:, 1::3] = float("-inf")
        return q, k, v, dict(attn_mask=mask), dict(attn_mask=mask)
    if kind in ("causal", "cross-attention causal"):
        return q, k, v, dict(is_causal=True), dict(is_causal=True)
    if kind == "custom scale":
        return q, k, v, dict(scale=0.3), dict(scale=0.3)
    return q, k, v, {}, {}


# --------------------------------------------------------------------------- scaled dot-product attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_sdpa_matches_torch(kind, dtype):
    q, k, v, ours, theirs = _case(kind, 12, 12, dtype)
    out, _ = scaled_dot_product_attention(q, k, v, **ours)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **theirs), **TOLERANCE[dtype])


@pytest.mark.parametrize("kind", ["bool mask", "float mask"])
def test_sdpa_takes_torchs_attn_mask_and_the_older_mask_spelling(kind):
    q, k, v, ours, theirs = _case(kind, 12, 12, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, **theirs)
    by_position, _ = scaled_dot_product_attention(q, k, v, theirs["attn_mask"])  # 4th argument, as in torch
    by_old_name, _ = scaled_dot_product_attention(q, k, v, mask=theirs["attn_mask"])
    torch.testing.assert_close(by_position, expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(by_old_name, expected, **TOLERANCE[torch.float32])
    with pytest.raises(TypeError, match="give the mask once"):
        scaled_dot_product_attention(q, k, v, attn_mask=theirs["attn_mask"], mask=theirs["attn_mask"])


def test_sdpa_without_weights_returns_the_tensor_torch_returns():
    q, k, v, ours, theirs = _case("padding mask", 12, 12, torch.float32)
    out = scaled_dot_product_attention(q, k, v, need_weights=False, **ours)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **theirs), **TOLERANCE[torch.float32])


def test_sdpa_accepts_unbatched_inputs():
    q, k, v = (t[0, 0] for t in _qkv(5, 9))  # (L, d) and (S, d)
    out, weights = scaled_dot_product_attention(q, k, v)
    assert out.shape == (5, 8) and weights.shape == (5, 9)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_weights_sum_to_one_and_are_exactly_zero_where_masked():
    q, k, v, ours, _ = _case("bool mask", 10, 14, torch.float32)
    _, weights = scaled_dot_product_attention(q, k, v, **ours)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 10))
    assert (weights.masked_select(~ours["attn_mask"].expand_as(weights)) == 0).all()


def test_causal_weights_are_zero_above_the_diagonal():
    q, k, v = _qkv(8, 8)
    _, weights = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (weights.triu(diagonal=1) == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool", "float -inf"])
def test_fully_masked_row_gives_zero_output_and_weights_like_torch(mask_dtype):
    q, k, v = _qkv(6, 6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False  # query 2 may attend to nothing
    if mask_dtype is torch.float32:
        mask = torch.zeros(6, 6).masked_fill(~mask, float("-inf"))
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask)
    assert not out.isnan().any() and not weights.isnan().any()
    assert (out[..., 2, :] == 0).all() and (weights[..., 2, :] == 0).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_fully_masked_row_has_finite_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(6, 6))
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    scaled_dot_product_attention(q, k, v, mask=mask)[0].sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_causal_mask_is_true_on_and_below_the_diagonal_and_equals_is_causal():
    mask = causal_mask(4)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, True, True, False], [True, True, True, True]]
    q, k, v = _qkv(7, 7)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=causal_mask(7))[0],
                               scaled_dot_product_attention(q, k, v, is_causal=True)[0])


def test_padding_mask_marks_real_tokens_for_every_head_and_query():
    mask = padding_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    assert mask.shape == (2, 1, 1, 4) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True, True, True, False], [True, True, False, False]]


# --------------------------------------------------------------------------- multi-head attention


def test_mha_from_hf_bert_reproduces_minilm_attention_on_padded_sentences(minilm):
    from transformers.masking_utils import create_bidirectional_mask

    tokenizer, model = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    real_tokens = batch["attention_mask"].bool()  # (batch, L)
    assert not real_tokens.all()  # the sentences differ in length, so there is padding
    bert_attention = model.encoder.layer[0].attention
    with torch.no_grad():
        hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        # the mask in the format the layer's attention implementation (sdpa or eager) expects
        hf_mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                            attention_mask=batch["attention_mask"])
        context, _ = bert_attention.self(hidden, attention_mask=hf_mask)
        theirs = bert_attention.output.dense(context)  # before dropout, residual and LayerNorm
        mha = MultiHeadAttention.from_hf_bert(bert_attention)
        ours, weights = mha(hidden, mask=padding_mask(batch["attention_mask"]), need_weights=True)
    torch.testing.assert_close(ours[real_tokens], theirs[real_tokens], rtol=1e-5, atol=1e-5)
    padded_keys = ~real_tokens[:, None, None, :].expand_as(weights)
    assert (weights.masked_select(padded_keys) == 0).all()


def test_mha_matches_torch_multihead_attention_with_a_causal_mask():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, batch_first=True)
    ours = MultiHeadAttention(32, 4)
    with torch.no_grad():
        for proj, weight, bias in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                                      theirs.in_proj_weight.chunk(3), theirs.in_proj_bias.chunk(3)):
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())
    x = torch.randn(2, 9, 32)
    expected, expected_weights = theirs(x, x, x, attn_mask=~causal_mask(9), average_attn_weights=False)
    out, weights = ours(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_mha_returns_no_weights_unless_asked():
    out, weights = MultiHeadAttention(16, 2)(torch.randn(1, 5, 16))
    assert out.shape == (1, 5, 16) and weights is None


def test_mha_drops_attention_weights_in_training_only():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 20, 16)
    mha.eval()
    eval_out, eval_weights = mha(x, need_weights=True)
    torch.testing.assert_close(mha(x)[0], eval_out)  # deterministic in eval mode
    mha.train()
    train_out, train_weights = mha(x, need_weights=True)
    dropped = train_weights == 0
    assert 0.3 < dropped.float().mean() < 0.7  # about half the weights dropped ...
    torch.testing.assert_close(train_weights[~dropped], 2 * eval_weights[~dropped])  # ... the rest scaled by 1/(1-p)
    assert not torch.allclose(train_out, eval_out)


# --------------------------------------------------------------------------- tiled attention


@pytest.mark.parametrize("block_size", [16, 48, 128])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_tiled_attention_matches_sdpa(kind, block_size):
    q, k, v, ours, theirs = _case(kind, 100, 100, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, **theirs)
    torch.testing.assert_close(tiled_attention(q, k, v, block_size=block_size, **ours), expected, rtol=1e-5, atol=1e-6)


def test_tiled_attention_matches_sdpa_in_float64_with_more_keys_than_queries_and_causal():
    q, k, v, ours, _ = _case("cross-attention causal", 37, 37, torch.float64)
    expected, _ = scaled_dot_product_attention(q, k, v, **ours)
    torch.testing.assert_close(tiled_attention(q, k, v, block_size=10, **ours), expected, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_tiled_attention_in_half_precision_is_as_accurate_as_torchs_sdpa(dtype, is_causal):
    # Reference in float64; torch's SDPA (fp32 accumulation inside its kernel) sets the bar for the dtype.
    # Accumulating m, ℓ and acc in fp16/bf16 instead gave 2.8x SDPA's error (bf16 5.9e-3 vs 2.1e-3).
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 64, generator=generator, dtype=torch.float64) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    low = [t.to(dtype) for t in (q, k, v)]
    torch_error = (F.scaled_dot_product_attention(*low, is_causal=is_causal).double() - reference).abs().max()
    tiled = tiled_attention(*low, block_size=64, is_causal=is_causal)
    assert tiled.dtype == dtype
    assert (tiled.double() - reference).abs().max() <= 1.5 * torch_error


def test_tiled_attention_takes_attn_mask_like_sdpa():
    q, k, v, ours, theirs = _case("float mask", 40, 40, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, **theirs)
    torch.testing.assert_close(tiled_attention(q, k, v, 16, theirs["attn_mask"]), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiled_attention(q, k, v, 16, mask=theirs["attn_mask"]), expected, rtol=1e-5, atol=1e-6)


def test_tiled_attention_gives_zero_for_fully_masked_rows():
    q, k, v = _qkv(40, 40)
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[[3, 35]] = False
    out = tiled_attention(q, k, v, block_size=16, mask=mask)
    assert (out[..., [3, 35], :] == 0).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_tiled_attention_gradients_match_sdpa():
    q, k, v, ours, theirs = _case("float mask", 50, 50, torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(tiled_attention(*inputs, block_size=16, **ours).square().sum(), inputs)
    expected = torch.autograd.grad(F.scaled_dot_product_attention(*inputs, **theirs).square().sum(), inputs)
    torch.testing.assert_close(grads, expected)


class _TensorLog(TorchDispatchMode):
    """Records the largest tensor every non-view op creates, and how many matrix products ran."""

    def __init__(self):
        super().__init__()
        self.largest, self.matmuls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not func.is_view:
            sizes = [t.numel() for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest, *sizes])
        self.matmuls += func.name().split("::")[-1] in ("mm", "bmm", "addmm", "baddbmm")
        return result


@pytest.mark.parametrize("kind", ["no mask", "padding mask", "causal"])
def test_tiled_attention_never_creates_an_L_by_S_score_matrix(kind):
    block_size, n = 64, 512
    q, k, v, ours, theirs = _case(kind, n, n, torch.float32)  # (2, 3, 512, 16); values (2, 3, 512, 8)
    with _TensorLog() as tiled_log:
        tiled_attention(q, k, v, block_size=block_size, **ours)
    with _TensorLog() as naive_log:
        scaled_dot_product_attention(q, k, v, **ours)
    batch_heads = 2 * 3
    tile, scores = batch_heads * block_size * block_size, batch_heads * n * n
    inputs_and_output = max(q.numel(), k.numel(), v.numel())  # the scaled copy of Q, the output
    assert tiled_log.largest <= max(tile, inputs_and_output) < scores // 20
    assert naive_log.largest >= scores


def test_causal_tiled_attention_skips_blocks_above_the_diagonal():
    q, k, v = _qkv(80, 80)
    n_blocks = 5  # 80 / 16
    with _TensorLog() as full_log:
        tiled_attention(q, k, v, block_size=16)
    with _TensorLog() as causal_log:
        tiled_attention(q, k, v, block_size=16, is_causal=True)
    assert full_log.matmuls == 2 * n_blocks * n_blocks  # QKᵀ and PV for each tile
    assert causal_log.matmuls == 2 * n_blocks * (n_blocks + 1) // 2  # only tiles on or below the diagonal


# --------------------------------------------------------------------------- bad input

_Q, _K, _V = _qkv(4, 4)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: scaled_dot_product_attention(_Q.tolist(), _K, _V), TypeError, "q must be a torch.Tensor, got list"),
        (lambda: scaled_dot_product_attention(_Q[0, 0, 0], _K, _V), ValueError, r"q must have shape \(\.\.\., seq"),
        (lambda: scaled_dot_product_attention(_Q, _K[..., :8], _V), ValueError, "same last dim d_k"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V[..., :3, :]), ValueError, "same length S"),
        (lambda: scaled_dot_product_attention(_Q, _K.double(), _V), TypeError, "share one dtype"),
        (lambda: scaled_dot_product_attention(_Q.long(), _K.long(), _V.long()), TypeError,
         "q must be a floating-point tensor, got dtype torch.int64"),
        (lambda: scaled_dot_product_attention(_Q, _K[:1].expand(3, 3, 4, 16), _V), ValueError, "do not broadcast"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, causal_mask(4), is_causal=True), ValueError, "not both"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, torch.ones(4, 4, dtype=torch.long)), TypeError,
         "bool .* or float"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, torch.zeros(4, 4, dtype=torch.float64)), TypeError,
         r"float attn_mask must have the dtype of the scores \(torch.float32\)"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, causal_mask(5)), ValueError,
         r"mask of shape \(5, 5\) does not broadcast"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, attn_mask=[[True]]), TypeError,
         "attn_mask must be a torch.Tensor or None, got list"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, is_causal=1), TypeError, "is_causal must be True or False"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, scale=0), ValueError, "scale must be > 0, got 0"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, scale=-1.0), ValueError, "scale must be > 0"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, scale="1"), TypeError, "scale must be a real number"),
        (lambda: scaled_dot_product_attention(_Q, _K, _V, need_weights=None), TypeError, "need_weights"),
        (lambda: causal_mask(0), ValueError, "seq_len must be >= 1, got 0"),
        (lambda: causal_mask(4.0), TypeError, "seq_len must be an int, got float"),
        (lambda: padding_mask([[1, 0]]), TypeError, "attention_mask must be a torch.Tensor, got list"),
        (lambda: padding_mask(torch.ones(2, 1, 4)), ValueError, r"shape \(batch, seq_len\)"),
        (lambda: padding_mask(torch.tensor([[1, 2]])), ValueError, "only 0 .* and 1"),
        (lambda: MultiHeadAttention(10, 3), ValueError, "d_model=10 is not divisible by n_heads=3"),
        (lambda: MultiHeadAttention(16, 0), ValueError, "n_heads must be >= 1, got 0"),
        (lambda: MultiHeadAttention(16.0, 2), TypeError, "d_model must be an int, got float"),
        (lambda: MultiHeadAttention(16, 2, dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        (lambda: MultiHeadAttention(16, 2, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        (lambda: MultiHeadAttention(16, 2, dropout="x"), TypeError, "dropout must be a real number, got str"),
        (lambda: MultiHeadAttention(16, 2, bias=1), TypeError, "bias must be True or False"),
        (lambda: MultiHeadAttention(16, 2)(torch.randn(1, 5, 8)), ValueError, r"d_model=16\), got \(1, 5, 8\)"),
        (lambda: MultiHeadAttention(16, 2)(torch.randn(5, 16)), ValueError, r"\(batch, seq_len, d_model=16\)"),
        (lambda: MultiHeadAttention(16, 2)([[0.0] * 16]), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: MultiHeadAttention(16, 2)(torch.randn(1, 5, 16), mask=causal_mask(4)), ValueError,
         r"mask of shape \(4, 4\) does not broadcast to .*\(1, 2, 5, 5\)"),
        (lambda: MultiHeadAttention.from_hf_bert(nn.Linear(4, 4)), TypeError, "expected a Hugging Face BertAttention"),
        (lambda: tiled_attention(_Q, _K, _V, block_size=0), ValueError, "block_size must be >= 1, got 0"),
        (lambda: tiled_attention(_Q, _K, _V, block_size=16.0), TypeError, "block_size must be an int, got float"),
        (lambda: tiled_attention(_Q, _K, _V, attn_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError,
         "does not broadcast"),
        (lambda: tiled_attention(_Q, _K, _V, attn_mask=causal_mask(4), mask=causal_mask(4)), TypeError,
         "give the mask once"),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
