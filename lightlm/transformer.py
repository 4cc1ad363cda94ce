"""A minimal Transformer, built on :mod:`lightlm.attention` (chapter 2, "Attention and the Transformer").

Three pieces, configurable down to tiny sizes: :class:`TransformerBlock` (pre- or post-LayerNorm),
:class:`EncoderClassifier` (bidirectional, mean-pooled, for sentence classification) and :class:`CausalLM`
(decoder-only, causal mask, tied embeddings, greedy or sampled generation). The post-LN block has BERT's
layout, so :meth:`TransformerBlock.from_hf_bert` loads a real BERT layer into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .attention import MultiHeadAttention, causal_mask, padding_mask


@dataclass
class TransformerConfig:
    """Sizes of a small Transformer. ``d_ff`` defaults to ``4 * d_model``."""

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None
    max_len: int = 128
    dropout: float = 0.0
    norm_first: bool = True  # pre-LN (GPT-2, Llama); False gives post-LN (the original Transformer, BERT)
    n_classes: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if not isinstance(self.d_ff, int) or self.d_ff < 1:
            raise ValueError(f"d_ff must be a positive int, got {self.d_ff!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")


class TransformerBlock(nn.Module):
    """Self-attention and a feed-forward network, each wrapped in a residual connection and a LayerNorm.

    Pre-LN:  x = x + Attn(LN(x));  x = x + FFN(LN(x))        (chapter 2, eq. (pre-ln))
    Post-LN: x = LN(x + Attn(x));  x = LN(x + FFN(x))        (chapter 2, eq. (post-ln))
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.attention = MultiHeadAttention(config.d_model, config.n_heads, dropout=config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff), nn.GELU(), nn.Linear(config.d_ff, config.d_model)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False):
        """``x``: (batch, seq, d_model) -> (same shape, attention weights (batch, heads, seq, seq) or None)."""
        if self.norm_first:
            attended, weights = self.attention(self.norm1(x), mask=mask, is_causal=is_causal, need_weights=need_weights)
            x = x + self.dropout(attended)
            x = x + self.dropout(self.ffn(self.norm2(x)))
        else:
            attended, weights = self.attention(x, mask=mask, is_causal=is_causal, need_weights=need_weights)
            x = self.norm1(x + self.dropout(attended))
            x = self.norm2(x + self.dropout(self.ffn(x)))
        return x, weights

    @classmethod
    def from_hf_bert(cls, bert_layer: nn.Module, n_heads: int) -> "TransformerBlock":
        """A post-LN block holding a copy of a Hugging Face ``BertLayer``'s weights (GELU, same eps)."""
        d_model = bert_layer.attention.self.query.in_features
        d_ff = bert_layer.intermediate.dense.out_features
        eps = bert_layer.output.LayerNorm.eps
        config = TransformerConfig(vocab_size=1, d_model=d_model, n_heads=n_heads, n_layers=1, d_ff=d_ff,
                                   norm_first=False, layer_norm_eps=eps)
        block = cls(config)
        block.attention = MultiHeadAttention.from_hf_bert(bert_layer.attention)
        pairs = [(block.norm1, bert_layer.attention.output.LayerNorm), (block.ffn[0], bert_layer.intermediate.dense),
                 (block.ffn[2], bert_layer.output.dense), (block.norm2, bert_layer.output.LayerNorm)]
        with torch.no_grad():
            for ours, theirs in pairs:
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
        return block.eval()


class _Backbone(nn.Module):
    """Token + learned position embeddings, then ``n_layers`` blocks (and a final LN when pre-LN)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:  # GPT-2's initialisation: N(0, 0.02), zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool,
                need_weights: bool):
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if seq > self.config.max_len:
            raise ValueError(f"sequence length {seq} exceeds max_len={self.config.max_len}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        positions = torch.arange(seq, device=input_ids.device)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))  # (batch, seq, d)
        mask = None
        if attention_mask is not None:
            mask = padding_mask(attention_mask)  # (batch, 1, 1, seq)
            if is_causal:
                mask = mask & causal_mask(seq, device=input_ids.device)  # (batch, 1, seq, seq)
                is_causal = False
        all_weights = []
        for block in self.blocks:
            x, weights = block(x, mask=mask, is_causal=is_causal, need_weights=need_weights)
            all_weights.append(weights)
        return self.final_norm(x), (all_weights if need_weights else None)


class EncoderClassifier(nn.Module):
    """Bidirectional encoder + mean pooling over real tokens + a linear head (chapter 2)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.backbone = _Backbone(config)
        self.head = nn.Linear(config.d_model, config.n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                need_weights: bool = False):
        """Returns logits (batch, n_classes); with ``need_weights`` also the per-layer attention weights."""
        hidden, weights = self.backbone(input_ids, attention_mask, is_causal=False, need_weights=need_weights)
        logits = self._classify(hidden, attention_mask)
        return (logits, weights) if need_weights else logits

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            pooled = hidden.mean(1)
        else:
            keep = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
            pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.head(pooled)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """``(logits, hidden, weights)``: the logits, the last hidden states (batch, seq, d_model) and every
        layer's attention weights (batch, heads, seq, seq), the three things feature distillation matches
        (chapter 5)."""
        hidden, weights = self.backbone(input_ids, attention_mask, is_causal=False, need_weights=True)
        return self._classify(hidden, attention_mask), hidden, weights


class CausalLM(nn.Module):
    """Decoder-only language model: causal self-attention, output layer tied to the token embedding."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.backbone = _Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.backbone.token_embedding.weight  # weight tying

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Returns next-token logits (batch, seq, vocab_size); position t sees tokens ≤ t only."""
        hidden, _ = self.backbone(input_ids, attention_mask, is_causal=True, need_weights=False)
        return self.lm_head(hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens: greedy when ``temperature == 0``, else sampled from
        softmax(logits / temperature), optionally restricted to the ``top_k`` most likely tokens."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0 or math.isnan(temperature):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size={self.config.vocab_size}], got {top_k}")
        was_training = self.training
        self.eval()
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_len:])[:, -1]  # (batch, vocab)
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        self.train(was_training)
        return ids
