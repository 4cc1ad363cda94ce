"""A minimal Transformer, built on :mod:`lightlm.attention` (chapter 2, "Attention and the Transformer").

Three pieces, configurable down to tiny sizes: :class:`TransformerBlock` (pre- or post-LayerNorm),
:class:`EncoderClassifier` (bidirectional, mean-pooled, for sentence classification) and :class:`CausalLM`
(decoder-only, causal mask, tied embeddings, greedy or sampled generation). The post-LN block has BERT's
layout, so :meth:`TransformerBlock.from_hf_bert` loads a real BERT layer into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_bool, check_int, check_real, check_tensor
from .attention import MultiHeadAttention, causal_mask, padding_mask
from .llama import LlamaLM  # the modern decoder (chapter 3), re-exported: lightlm.transformer.LlamaLM

__all__ = ["TransformerConfig", "TransformerBlock", "EncoderClassifier", "CausalLM", "LlamaLM"]


@dataclass
class TransformerConfig:
    """Sizes of a small Transformer. ``d_ff`` defaults to ``4 * d_model``.

    ``pad_token_id``: None (the default), or the id of the padding token, which then becomes the token
    embedding's ``padding_idx`` (as in Hugging Face's BERT and Llama): its row starts at zero and receives no
    gradient from the embedding lookup. Setting it changes no other initial weight (the random draws are the
    same); attention to padding is still controlled by ``attention_mask``.
    """

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None
    max_len: int = 128
    dropout: float = 0.0
    norm_first: bool = True  # pre-LN (GPT-2, Llama); False gives post-LN (the original Transformer, BERT)
    n_classes: int = 2
    pad_token_id: int | None = None
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len", "n_classes"):
            check_int(name, getattr(self, name), min=1)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        check_int("d_ff", self.d_ff, min=1)
        check_real("dropout", self.dropout, min=0, max=1, max_open=True)
        check_bool("norm_first", self.norm_first)
        check_real("layer_norm_eps", self.layer_norm_eps, min=0, min_open=True)
        if self.pad_token_id is not None:
            check_int("pad_token_id", self.pad_token_id, min=0, max=self.vocab_size - 1)


class TransformerBlock(nn.Module):
    """Self-attention and a feed-forward network, each wrapped in a residual connection and a LayerNorm.

    Pre-LN:  x = x + Attn(LN(x));  x = x + FFN(LN(x))
    Post-LN: x = LN(x + Attn(x));  x = LN(x + FFN(x))        (both: chapter 2, eq. (blocks))
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
    def from_hf_bert(cls, bert_layer: nn.Module, n_heads: int | None = None) -> "TransformerBlock":
        """A post-LN block holding a copy of a Hugging Face ``BertLayer``'s weights (GELU, same eps), in eval
        mode (for inference; its own dropout is 0).

        The number of heads is the layer's own ``num_attention_heads``; ``n_heads``, if given, is checked
        against it (a ValueError when they differ).
        """
        try:
            d_model = bert_layer.attention.self.query.in_features
            layer_heads = bert_layer.attention.self.num_attention_heads
            d_ff = bert_layer.intermediate.dense.out_features
            eps = bert_layer.output.LayerNorm.eps
        except AttributeError:
            raise TypeError(f"expected a Hugging Face BertLayer (model.encoder.layer[i]), "
                            f"got {type(bert_layer).__name__}") from None
        if n_heads is not None and check_int("n_heads", n_heads, min=1) != layer_heads:
            raise ValueError(f"n_heads={n_heads} but the BERT layer has num_attention_heads={layer_heads}; "
                             "leave n_heads out to take the layer's")
        n_heads = layer_heads
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


def _check_ids(input_ids: torch.Tensor, config: TransformerConfig) -> None:
    """input_ids: an integer tensor (batch, seq) of ids in [0, vocab_size)."""
    check_tensor("input_ids", input_ids, kind="int")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
        raise ValueError(f"token ids must be in [0, vocab_size={config.vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")


class _Backbone(nn.Module):
    """Token + learned position embeddings, then ``n_layers`` blocks (and a final LN when pre-LN)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.position_embedding = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = (nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first
                           else nn.Identity())
        self.dropout = nn.Dropout(config.dropout)
        self.apply(self._init)
        if config.pad_token_id is not None:  # padding_idx: a zero row, as nn.Embedding makes it (no random draw)
            with torch.no_grad():
                self.token_embedding.weight[config.pad_token_id].zero_()

    @staticmethod
    def _init(module: nn.Module) -> None:  # GPT-2's initialisation: N(0, 0.02), zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool,
                need_weights: bool):
        _check_ids(input_ids, self.config)
        batch, seq = input_ids.shape
        if seq > self.config.max_len:
            raise ValueError(f"sequence length {seq} exceeds max_len={self.config.max_len}")
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
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
        (chapter 7)."""
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
        softmax(logits / temperature), optionally restricted to the ``top_k`` most likely tokens.

        ``input_ids``: (batch, seq) integer prompt ids; the model reads at most its last ``max_len`` tokens.
        Returns (batch, seq + max_new_tokens). The train/eval mode is restored afterwards.
        """
        _check_ids(input_ids, self.config)
        check_int("max_new_tokens", max_new_tokens, min=0)
        temperature = check_real("temperature", temperature, min=0)
        if top_k is not None:
            check_int("top_k", top_k, min=1, max=self.config.vocab_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
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
