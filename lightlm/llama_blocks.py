"""The pieces of a Llama decoder layer, from scratch (chapter 3, "The modern decoder: SmolLM2 from scratch").

:class:`RMSNorm` (eq. (rmsnorm)), rotary position embeddings (:func:`rope_frequencies`, :func:`apply_rope`,
eqs. (rope-rotation) and (rope-relative)), the :class:`SwiGLU` feed-forward network (eq. (swiglu)),
:class:`GroupedQueryAttention` (eq. (gqa)) with a :class:`KVCache`, and the pre-norm :class:`LlamaDecoderLayer`
(eq. (llama-block)). Attribute names are Hugging Face's (``q_proj``, ``gate_proj``, ``input_layernorm``...), so
a ``LlamaForCausalLM`` state dict loads as it is; :mod:`lightlm.llama` assembles the layers into a model.

RoPE uses the "rotate-half" layout of Hugging Face Llama: coordinate i of a head is paired with coordinate
i + d/2 (not with its neighbour i + 1 as in the RoFormer paper); it is the same rotation with the coordinates
permuted, and it is what the checkpoints were trained with.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_int, check_real, check_tensor
from .attention import scaled_dot_product_attention

__all__ = ["RMSNorm", "rope_frequencies", "rotate_half", "apply_rope", "SwiGLU", "KVCache",
           "GroupedQueryAttention", "LlamaDecoderLayer"]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019; chapter 3, eq. (rmsnorm)).

    ``RMSNorm(x) = g ⊙ x / sqrt(mean(x²) + eps)`` over the last dimension: LayerNorm without the mean
    subtraction and without the bias. Computed in float32 whatever the input dtype, as Hugging Face does.
    """

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        check_int("d_model", d_model, min=1)
        self.eps = check_real("eps", eps, min=0, min_open=True)
        self.weight = nn.Parameter(torch.ones(d_model))  # the gain g, (d_model,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> the same shape."""
        check_tensor("x", x, kind="float", min_ndim=1)
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"x must end in d_model={self.weight.shape[0]}, got shape {tuple(x.shape)}")
        x32 = x.float()
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # 1 / sqrt(mean(x²) + eps), (..., 1)
        return self.weight * (x32 * rms).to(x.dtype)  # g ⊙ x / RMS(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_frequencies(head_dim: int, positions: torch.Tensor, theta: float = 10000.0,
                     dtype: torch.dtype = torch.float32):
    """cos and sin of the rotary angles m·θ_i (chapter 3, eq. (rope-rotation)), rotate-half layout.

    θ_i = theta^(-2i/d) for i = 0 .. d/2 - 1; each angle appears twice, at i and at i + d/2, so that
    :func:`apply_rope` can rotate the pair (x_i, x_{i+d/2}) by m·θ_i.

    Args:
        head_dim: d, the width of one head (even).
        positions: integer positions m, any shape, e.g. (batch, seq) or (seq,).
        theta: the base (Hugging Face's ``rope_theta``; 10,000 in the paper, 100,000 in SmolLM2).
        dtype: of the angles; float32 as Hugging Face computes them (so far positions lose a few digits),
            float64 for exact checks.

    Returns:
        ``(cos, sin)``, each of shape (*positions.shape, head_dim) and the given dtype.
    """
    check_int("head_dim", head_dim, min=2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (coordinates are rotated in pairs), got {head_dim}")
    check_tensor("positions", positions, kind="int")
    theta = check_real("theta", theta, min=1, min_open=True)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    exponents = torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim  # 2i/d
    inv_freq = 1.0 / (theta ** exponents)  # θ_i = theta^(-2i/d), (d/2,)
    angles = positions[..., None].to(dtype) * inv_freq  # m·θ_i, (..., d/2)
    angles = torch.cat((angles, angles), dim=-1)  # the same angle for coordinate i and i + d/2, (..., d)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x_1, x_2) -> (-x_2, x_1), halves of the last dimension: multiplication by i in each rotation plane."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair of every head by m·θ_i (chapter 3, eq. (rope-rotation)).

    Args:
        x: queries or keys (batch, heads, seq, head_dim).
        cos, sin: from :func:`rope_frequencies`, (batch, seq, head_dim) or (seq, head_dim).

    Returns:
        x·cos + rotate_half(x)·sin, in x's dtype and shape.
    """
    check_tensor("x", x, kind="float", ndim=4)
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, kind="float", ndim=(2, 3))
        if table.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"{name} must end in (seq, head_dim)={tuple(x.shape[-2:])}, got {tuple(table.shape)}")
    if cos.ndim == 3:  # (batch, seq, d) -> (batch, 1, seq, d): the same rotation for every head
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin  # [x_1 cos - x_2 sin, x_2 cos + x_1 sin]


class SwiGLU(nn.Module):
    """The gated feed-forward network of Llama (Shazeer 2020; chapter 3, eq. (swiglu)).

    ``FFN(x) = W_down (SiLU(x W_gate) ⊙ x W_up)``, three bias-free matrices, d_model -> d_ff -> d_model.
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("d_ff", d_ff, min=1)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)  # W_gate
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)  # W_up
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)  # W_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        gate = nn.functional.silu(self.gate_proj(x))  # SiLU(x W_gate) = z·σ(z), (..., d_ff)
        return self.down_proj(gate * self.up_proj(x))  # W_down (gate ⊙ x W_up)


class KVCache:
    """The keys and values of every layer for the positions seen so far (chapter 3, eq. (kv-decode)).

    ``keys[l]`` and ``values[l]`` are (batch, kv_heads, seq_so_far, head_dim), after RoPE. A layer calls
    :meth:`update` with its new keys and values; they are appended along the sequence and the whole history is
    returned. The first call for a layer (prefill) stores the prompt; each later call (decode) adds one token.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def seq_len(self) -> int:
        """Number of positions cached (0 when empty)."""
        return self.keys[0].shape[-2] if self.keys else 0

    def nbytes(self) -> int:
        """Bytes held by all cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (batch, kv_heads, new, head_dim) to layer ``layer_index``; return all its keys, values."""
        check_int("layer_index", layer_index, min=0, max=len(self.keys))
        if layer_index == len(self.keys):  # first call for this layer: prefill
            self.keys.append(k)
            self.values.append(v)
        else:  # decode: K ← [K_past; k], V ← [V_past; v]
            self.keys[layer_index] = torch.cat((self.keys[layer_index], k), dim=-2)
            self.values[layer_index] = torch.cat((self.values[layer_index], v), dim=-2)
        return self.keys[layer_index], self.values[layer_index]


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with RoPE, ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads
    (Ainslie et al. 2023; chapter 3, eq. (gqa)). ``n_kv_heads == n_heads`` is multi-head attention,
    ``n_kv_heads == 1`` multi-query attention. Query head h reads key/value head h // (n_heads / n_kv_heads).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim)):
            check_int(name, value, min=1)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)  # W_Q
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)  # W_K: only n_kv_heads heads
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)  # W_V: only n_kv_heads heads
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)  # W_O

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer_index: int = 0) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model).

        ``cos``/``sin``: the rotations of the L new positions. ``mask``: bool, True = may attend, broadcastable
        to (batch, heads, L, S) with S = cached + L keys; None means causal (query i sees keys up to its own
        position). ``cache``: a :class:`KVCache`, extended in place with this layer's new keys and values.
        """
        check_tensor("x", x, kind="float", ndim=3)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, seq, d_model={self.d_model}), got {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)  # (batch, H, L, d)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (batch, H_kv, L, d)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (batch, H_kv, L, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate by position m: R_m q, R_n k
        if cache is not None:
            k, v = cache.update(layer_index, k, v)  # the whole history, (batch, H_kv, S, d)
        if mask is None:  # causal, aligned at the end: query i is position S - L + i
            mask = torch.ones(seq, k.shape[-2], dtype=torch.bool, device=x.device).tril(k.shape[-2] - seq)
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # each K/V head serves `group` query heads, (batch, H, S, d)
        v = v.repeat_interleave(group, dim=1)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, need_weights=False)  # softmax(QKᵀ/√d + M) V
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))  # concat · W_O


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer (chapter 3, eq. (llama-block)):
    ``x ← x + GQA(RMSNorm(x))``, then ``x ← x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int,
                 eps: float = 1e-6):
        super().__init__()
        self.input_layernorm = RMSNorm(d_model, eps)
        self.self_attn = GroupedQueryAttention(d_model, n_heads, n_kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer_index: int = 0) -> torch.Tensor:
        """x (batch, L, d_model) -> the same shape; arguments as :meth:`GroupedQueryAttention.forward`."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_index)  # x + GQA(RMSNorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))  # x + SwiGLU(RMSNorm(x))
