"""Scaled dot-product attention, multi-head attention and tiled (FlashAttention-style) attention (chapter 2,
"Attention and the Transformer").

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask is True where a query may
attend to a key; a float mask is added to the scores (0 keeps a key, -inf removes it). A mask broadcasts to
the score shape ``(..., L, S)``: L queries, S keys. ``is_causal`` lets query i see keys j <= i (the top-left
aligned triangle, as torch does when L != S). The mask argument is called ``attn_mask``, as in torch
(``mask=`` is accepted too); beware ``torch.nn.MultiheadAttention``, whose bool masks mean the opposite.

A query whose keys are all masked (a fully masked row, by False or by -inf) gets weights 0 and output 0,
never NaN, and finite gradients: the "safe softmax" of torch's own SDPA (checked on torch 2.13, CPU, fused
and math backends), so we match torch there too. A plain softmax would give 0/0 = NaN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bool, check_int, check_real, check_score_mask, check_tensor

__all__ = ["scaled_dot_product_attention", "causal_mask", "padding_mask", "MultiHeadAttention", "tiled_attention"]

# --------------------------------------------------------------------------- checks


def _prepare(q: Any, k: Any, v: Any, attn_mask: Any, mask: Any, is_causal: Any,
             scale: Any) -> tuple[torch.Size, int, int, torch.Tensor | None, float]:
    """Validate q (..., L, d_k), k (..., S, d_k), v (..., S, d_v), the mask (``attn_mask`` or its alias
    ``mask``), is_causal and scale; return (broadcast leading dims, L, S, mask, scale: 1/√d_k by default)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor, kind="float")
        if tensor.ndim < 2:
            raise ValueError(f"{name} must have shape (..., seq_len, dim), got {tuple(tensor.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same last dim d_k: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v need the same length S: k {tuple(k.shape)}, v {tuple(v.shape)}")
    try:
        batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(f"leading (batch, heads) dims of q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not broadcast") from None
    if attn_mask is not None and mask is not None:
        raise TypeError("give the mask once: attn_mask= (torch's name) or mask=, not both")
    mask = mask if attn_mask is None else attn_mask
    if check_bool("is_causal", is_causal) and mask is not None:
        raise ValueError("give either attn_mask or is_causal=True, not both (as torch's SDPA); "
                         "combine them yourself: mask & causal_mask(L)")
    if mask is not None:  # named as the caller named it
        name = "mask" if attn_mask is None else "attn_mask"
        check_score_mask(name, mask, torch.Size((*batch_shape, q.shape[-2], k.shape[-2])), q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_real("scale", scale, min=0, min_open=True)
    return batch_shape, q.shape[-2], k.shape[-2], mask, scale


def _causal(n_queries: int, n_keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, S) bool, True where key j <= query i (top-left aligned, like torch's is_causal)."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril()


# --------------------------------------------------------------------------- masks


def causal_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool mask, True on and below the diagonal: token i may attend to tokens 0..i (chapter 2)."""
    return _causal(check_int("seq_len", seq_len, min=1), seq_len, device)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, 1, 1, S) bool mask from a Hugging Face style 0/1 ``attention_mask`` of shape (batch, S).

    True where a key is a real token (may be attended), False at padding; it broadcasts over heads and
    queries, to (batch, heads, L, S).
    """
    check_tensor("attention_mask", attention_mask)
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must have shape (batch, seq_len), got {tuple(attention_mask.shape)}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, S)


# --------------------------------------------------------------------------- scaled dot-product attention


def _attention(q: Any, k: Any, v: Any, attn_mask: Any, mask: Any, is_causal: Any, scale: Any,
               dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA with optional dropout on the weights (for MultiHeadAttention); returns (out, weights)."""
    _, L, S, mask, scale = _prepare(q, k, v, attn_mask, mask, is_causal, scale)
    scores = (q @ k.transpose(-2, -1)) * scale  # QKᵀ/√d_k, (..., L, S)
    if is_causal:
        mask = _causal(L, S, q.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))  # masked keys get score -inf, weight 0
    elif mask is not None:
        scores = scores + mask  # additive mask: 0 keeps, -inf removes
    fully_masked = (scores == float("-inf")).all(-1, keepdim=True)  # (..., L, 1) rows with no key left
    weights = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1)  # softmax over the S keys
    weights = weights.masked_fill(fully_masked, 0.0)  # "safe softmax": such rows get weights 0, not NaN
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # softmax(QKᵀ/√d_k) V, (..., L, d_v)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
    is_causal: bool = False, scale: float | None = None, *, mask: torch.Tensor | None = None,
    need_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """softmax(QKᵀ/√d_k + M) V (chapter 2, "Attention and the Transformer", eq. (sdpa)).

    Unlike ``torch.nn.functional.scaled_dot_product_attention``, it returns the attention weights too,
    ``(out, weights)``, by default: they are what the chapter looks at. ``need_weights=False`` returns
    ``out`` alone, as torch's function does. The other arguments are torch's (no ``dropout_p``).

    Args:
        q, k, v: queries (..., L, d_k), e.g. (batch, heads, L, d_head); keys (..., S, d_k), where S may
            differ from L (cross-attention); values (..., S, d_v).
        attn_mask: None, bool (True = may attend) or float (added to the scores), broadcastable to
            (..., L, S); ``mask=`` is the same argument under its older name.
        is_causal: mask out keys j > i; not together with ``attn_mask``.
        scale: multiplies QKᵀ; default 1/√d_k.

    Returns:
        ``(out, weights)``: out (..., L, d_v) and the attention weights (..., L, S); each row sums to 1,
        masked keys get exactly 0, and a row whose keys are all masked gets weights 0 and output 0.
    """
    out, weights = _attention(q, k, v, attn_mask, mask, is_causal, scale)
    return (out, weights) if check_bool("need_weights", need_weights) else out


# --------------------------------------------------------------------------- multi-head attention


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (chapter 2, eq. (mha)): heads attend in d_model/n_heads-wide subspaces.

    ``MHA(X) = concat(head_1, ..., head_h) W_O`` with ``head_i = softmax(Q_i K_iᵀ/√d_head) V_i`` and
    ``Q = X W_Q``, ``K = X W_K``, ``V = X W_V``, as in BERT (``from_hf_bert`` copies a real layer's weights).

    Mask polarity: a bool ``mask`` is True where a query MAY attend, as in
    ``F.scaled_dot_product_attention`` — the OPPOSITE of ``torch.nn.MultiheadAttention``, whose bool
    ``attn_mask`` and ``key_padding_mask`` are True where attention is NOT allowed. To reuse a mask made for
    ``nn.MultiheadAttention``, pass ``~mask``. Float masks (added to the scores) mean the same in both.

    Args:
        d_model: width of the input and output.
        n_heads: number of heads; must divide d_model.
        bias: whether the four projections have biases.
        dropout: probability of dropping an attention weight, in training only.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("n_heads", n_heads, min=1)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        check_bool("bias", bias)
        check_real("dropout", dropout, min=0, max=1, max_open=True)
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.dropout = float(dropout)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W_Q
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W_K
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W_V
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W_O

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}, dropout={self.dropout}"

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.n_heads, self.d_head).transpose(1, 2)  # (batch, heads, L, d_head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (batch, L, d_model) -> ``(out, weights)``: out (batch, L, d_model); weights (batch, heads, L, L)
        (those that multiplied V, so after dropout in training) if ``need_weights``, else None.

        ``mask`` is bool (True = MAY attend, the opposite of ``nn.MultiheadAttention``) or float (added),
        broadcastable to (batch, heads, L, L), e.g. ``padding_mask(attention_mask)`` or ``causal_mask(L)``.
        """
        check_tensor("x", x)
        check_bool("need_weights", need_weights)
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, seq_len, d_model={self.d_model}), got {tuple(x.shape)}")
        batch, seq_len, _ = x.shape
        q = self._split_heads(self.q_proj(x))  # Q = X W_Q, (batch, heads, L, d_head)
        k = self._split_heads(self.k_proj(x))  # K = X W_K, (batch, heads, L, d_head)
        v = self._split_heads(self.v_proj(x))  # V = X W_V, (batch, heads, L, d_head)
        dropout_p = self.dropout if self.training else 0.0
        heads, weights = _attention(q, k, v, None, mask, is_causal, None, dropout_p)  # (batch, heads, L, d_head)
        concat = heads.transpose(1, 2).reshape(batch, seq_len, self.d_model)  # concat(head_1..head_h)
        return self.out_proj(concat), (weights if need_weights else None)  # concat(...) W_O

    @classmethod
    def from_hf_bert(cls, bert_attention: nn.Module) -> "MultiHeadAttention":
        """A copy of a Hugging Face ``BertAttention`` (``model.encoder.layer[i].attention``).

        Takes W_Q, W_K, W_V from ``.self.query/.key/.value`` and W_O from ``.output.dense``; the residual
        and LayerNorm of ``.output`` are not part of attention and stay behind. Same device, dtype and
        train/eval mode as the source.
        """
        try:
            self_attention, dense = bert_attention.self, bert_attention.output.dense
            query, key, value = self_attention.query, self_attention.key, self_attention.value
            n_heads = self_attention.num_attention_heads
        except AttributeError:
            raise TypeError(f"expected a Hugging Face BertAttention (with .self.query/.key/.value and "
                            f".output.dense), got {type(bert_attention).__name__}") from None
        d_model = query.in_features
        if query.out_features != d_model or dense.out_features != d_model:
            raise ValueError(f"attention width {query.out_features} differs from hidden size {d_model}; "
                             "MultiHeadAttention needs them equal")
        mha = cls(d_model, n_heads, bias=query.bias is not None, dropout=self_attention.dropout.p)
        mha.to(device=query.weight.device, dtype=query.weight.dtype)
        with torch.no_grad():
            for ours, theirs in ((mha.q_proj, query), (mha.k_proj, key), (mha.v_proj, value), (mha.out_proj, dense)):
                ours.weight.copy_(theirs.weight)
                if ours.bias is not None:
                    ours.bias.copy_(theirs.bias)
        return mha.train(bert_attention.training)


# --------------------------------------------------------------------------- tiled attention


def _tile(mask: torch.Tensor, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
    """The (..., q1-q0, k1-k0) block of a mask that broadcasts to (..., L, S) (size-1 dims stay whole)."""
    rows = slice(None) if mask.shape[-2] == 1 else slice(q0, q1)
    cols = slice(None) if mask.shape[-1] == 1 else slice(k0, k1)
    return mask[..., rows, cols]


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 128, attn_mask: torch.Tensor | None = None,
    is_causal: bool = False, scale: float | None = None, *, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(QKᵀ/√d_k + M) V one tile at a time, with an online softmax (chapter 2, eq. (online-softmax);
    Dao et al. 2022, "FlashAttention", algorithm 1).

    Queries and keys are cut into blocks of ``block_size``; for each query block we sweep the key blocks and
    keep, per query, the running max m, the running normaliser ℓ = Σ exp(s - m) and the unnormalised output
    acc = Σ exp(s - m) v. When a new block raises the max, the old ℓ and acc are rescaled by exp(m_old - m_new).
    Only (batch·heads, block, block) score tiles exist; never the (..., L, S) matrix. With ``is_causal``, key
    blocks entirely above the diagonal are skipped. Same arguments and result as :func:`scaled_dot_product_attention`
    (fully masked rows give 0), returning ``out`` only; differentiable. As in FlashAttention's kernels, m, ℓ and
    acc are kept in float32 (float64 stays float64) and only the result is cast back to the input dtype.
    """
    batch_shape, L, S, mask, scale = _prepare(q, k, v, attn_mask, mask, is_causal, scale)
    check_int("block_size", block_size, min=1)
    if mask is not None:
        mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)  # at least (L or 1, S or 1)
    d_k, d_v, in_dtype = q.shape[-1], v.shape[-1], q.dtype
    # scores, m, ℓ and acc in float32 at least, as FlashAttention's kernels keep them (no-op for fp32/fp64)
    q, k, v = (t.to(torch.promote_types(in_dtype, torch.float32)) for t in (q, k, v))
    # batch and heads flattened into one dim, so each tile is one batched matmul: (batch·heads, seq, dim)
    q = (q * scale).expand(*batch_shape, L, d_k).reshape(-1, L, d_k)  # Q/√d_k, scaled once, not per tile
    k_t = k.expand(*batch_shape, S, d_k).reshape(-1, S, d_k).transpose(1, 2)  # Kᵀ, (batch·heads, d_k, S)
    v = v.expand(*batch_shape, S, d_v).reshape(-1, S, d_v)  # (batch·heads, S, d_v)
    above_diagonal = ~_causal(block_size, block_size, q.device)  # what a tile on the diagonal hides
    out = q.new_empty(q.shape[0], L, d_v)  # (batch·heads, L, d_v)
    for q0 in range(0, L, block_size):
        q1 = min(q0 + block_size, L)
        q_block = q[:, q0:q1]  # Q_i, (batch·heads, Bq, d_k)
        m = q.new_full((q.shape[0], q1 - q0, 1), float("-inf"))  # running max, (batch·heads, Bq, 1)
        norm = q.new_zeros((q.shape[0], q1 - q0, 1))  # running normaliser ℓ, (batch·heads, Bq, 1)
        acc = q.new_zeros((q.shape[0], q1 - q0, d_v))  # Σ exp(s - m) v, (batch·heads, Bq, d_v)
        k_end = min(q1, S) if is_causal else S  # causal: key blocks right of the diagonal are all hidden
        for k0 in range(0, k_end, block_size):
            k1 = min(k0 + block_size, S)
            scores = torch.bmm(q_block, k_t[:, :, k0:k1])  # S_ij = Q_i K_jᵀ/√d_k, (batch·heads, Bq, Bk)
            if is_causal and k1 > q0 + 1:  # the tile on the diagonal (k0 == q0)
                scores.masked_fill_(above_diagonal[: q1 - q0, : k1 - k0], float("-inf"))
            elif mask is not None:
                scores_view = scores.view(*batch_shape, q1 - q0, k1 - k0)  # the same memory, mask-shaped
                mask_tile = _tile(mask, q0, q1, k0, k1)
                if mask.dtype == torch.bool:
                    scores_view.masked_fill_(~mask_tile, float("-inf"))
                else:
                    scores_view.add_(mask_tile)  # S_ij + M_ij
            # m is a constant for autograd: it cancels between acc and ℓ, so its gradient is exactly 0
            m_new = torch.maximum(m, scores.detach().amax(-1, keepdim=True))  # max(m_old, rowmax(S_ij))
            m_new_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # a row with no key yet: exp stays 0
            p = scores.sub_(m_new_safe).exp_()  # P_ij = exp(S_ij - m_new), in place, (batch·heads, Bq, Bk)
            rescale = torch.exp(m - m_new_safe)  # exp(m_old - m_new), (batch·heads, Bq, 1)
            norm = norm * rescale + p.sum(-1, keepdim=True)  # ℓ_new = e^(m_old-m_new) ℓ_old + rowsum(P_ij)
            acc = torch.baddbmm(acc * rescale, p, v[:, k0:k1])  # acc_new = e^(m_old-m_new) acc_old + P_ij V_j
            m = m_new
        out[:, q0:q1] = acc / norm.masked_fill(norm == 0, 1.0)  # O_i = acc / ℓ; fully masked rows stay 0
    return out.view(*batch_shape, L, d_v).to(in_dtype)  # back to the input dtype
