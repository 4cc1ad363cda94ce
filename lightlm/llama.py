"""A Llama-architecture causal LM from scratch, loadable from Hugging Face (chapter 3, "The modern decoder:
SmolLM2 from scratch").

:class:`LlamaLM` stacks the layers of :mod:`lightlm.llama_blocks` (RMSNorm, RoPE, SwiGLU, grouped-query
attention, KV cache) between a token embedding and a final RMSNorm and output layer (eq. (llama-block)).
:meth:`LlamaLM.from_hf` copies the weights and sizes of a Hugging Face ``LlamaForCausalLM`` (such as SmolLM2),
and then reproduces its logits; :meth:`LlamaLM.generate` decodes greedily, with or without the KV cache.
Also available as ``lightlm.transformer.LlamaLM``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_bool, check_int, check_module, check_real, check_tensor
from .attention import padding_mask
from .llama_blocks import KVCache, LlamaDecoderLayer, RMSNorm, rope_frequencies

__all__ = ["LlamaConfig", "LlamaLM", "KVCache"]


@dataclass
class LlamaConfig:
    """Sizes of a Llama model, named as in this book (Hugging Face's names in brackets).

    ``head_dim`` defaults to ``d_model // n_heads``; ``n_kv_heads`` (num_key_value_heads) defaults to
    ``n_heads`` (no grouping). SmolLM2-135M: vocab 49,152, d_model 576, 30 layers, 9 heads, 3 KV heads,
    d_ff 1536, rope_theta 100,000, tied embeddings.
    """

    vocab_size: int
    d_model: int = 64  # hidden_size
    n_layers: int = 2  # num_hidden_layers
    n_heads: int = 4  # num_attention_heads
    n_kv_heads: int | None = None  # num_key_value_heads
    d_ff: int = 172  # intermediate_size
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            check_int(name, getattr(self, name), min=1)
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else check_int("n_kv_heads", self.n_kv_heads, min=1)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; give head_dim")
            self.head_dim = self.d_model // self.n_heads
        check_int("head_dim", self.head_dim, min=2)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        check_real("rope_theta", self.rope_theta, min=1, min_open=True)
        check_real("rms_norm_eps", self.rms_norm_eps, min=0, min_open=True)
        check_bool("tie_word_embeddings", self.tie_word_embeddings)


def _config_from_hf(hf_config) -> LlamaConfig:
    """Our LlamaConfig from a transformers LlamaConfig; ValueError for what this implementation lacks."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not rope:  # older transformers: rope_theta and rope_scaling attributes
        rope = dict(getattr(hf_config, "rope_scaling", None) or {}, rope_theta=getattr(hf_config, "rope_theta", 1e4))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling of type {rope_type!r} is not implemented; only plain RoPE "
                         "(rope_type 'default', no rope_scaling) is supported")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {hf_config.hidden_act!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ValueError(f"{flag}=True is not supported: this implementation has bias-free projections")
    return LlamaConfig(vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
                       n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads,
                       n_kv_heads=hf_config.num_key_value_heads, d_ff=hf_config.intermediate_size,
                       head_dim=getattr(hf_config, "head_dim", None), rope_theta=float(rope["rope_theta"]),
                       rms_norm_eps=float(hf_config.rms_norm_eps),
                       tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))


class LlamaLM(nn.Module):
    """Decoder-only LM: embedding, ``n_layers`` :class:`~lightlm.llama_blocks.LlamaDecoderLayer`, final RMSNorm,
    output layer (tied to the embedding or not). No position table: positions enter through RoPE."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a lightlm.llama.LlamaConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
                                                      c.rms_norm_eps) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        for module in self.modules():  # Hugging Face's initialisation: N(0, 0.02); RMSNorm gains stay 1
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        self._tie()

    def _tie(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # logits = h Eᵀ

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "LlamaLM":
        """A copy of a Hugging Face ``LlamaForCausalLM`` (sizes, RoPE base, eps, weights), on its device and
        dtype, in eval mode.

        Raises:
            TypeError: ``hf_model`` is not a ``LlamaForCausalLM``.
            ValueError: its config uses something not implemented here (rope scaling, biases, another
                activation).
        """
        check_module("hf_model", hf_model)
        from transformers import LlamaForCausalLM

        if not isinstance(hf_model, LlamaForCausalLM):
            raise TypeError(f"hf_model must be a transformers LlamaForCausalLM, got {type(hf_model).__name__}")
        config = _config_from_hf(hf_model.config)
        weight = hf_model.lm_head.weight
        with torch.device("meta"):  # no time spent on a random initialisation that is overwritten at once
            model = cls(config)
        model = model.to_empty(device=weight.device).to(weight.dtype)
        state = {name.removeprefix("model."): tensor for name, tensor in hf_model.state_dict().items()}
        model._tie()  # to_empty made two tensors of the tied one
        model.load_state_dict(state, strict=True)  # same names as Hugging Face's, so every weight is matched
        return model.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None):
        """Next-token logits (batch, L, vocab_size) for ``input_ids`` (batch, L).

        Args:
            attention_mask: 0/1 (batch, cached + L), 0 at padding; None = no padding.
            cache: None, or a :class:`KVCache` holding the earlier positions; it is extended in place and
                ``(logits, cache)`` is returned.
            position_ids: (batch, L) or (1, L) integer positions; default ``cached + arange(L)`` (as Hugging
                Face's forward; :meth:`generate` counts them from the attention mask instead).
        """
        c = self.config
        check_tensor("input_ids", input_ids, kind="int", ndim=2)
        batch, seq = input_ids.shape
        if seq == 0 or input_ids.min() < 0 or input_ids.max() >= c.vocab_size:
            raise ValueError(f"input_ids must be (batch, seq>=1) ids in [0, {c.vocab_size}), got shape "
                             f"{tuple(input_ids.shape)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a lightlm.llama.KVCache or None, got {type(cache).__name__}")
        past = cache.seq_len if cache is not None else 0
        if cache is not None and cache.keys and cache.keys[0].shape[0] != batch:
            raise ValueError(f"the cache holds batch {cache.keys[0].shape[0]}, input_ids has batch {batch}")
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device)[None]  # (1, L)
        check_tensor("position_ids", position_ids, kind="int", ndim=2)
        if position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be (batch or 1, {seq}), got {tuple(position_ids.shape)}")
        mask = torch.ones(seq, past + seq, dtype=torch.bool, device=input_ids.device).tril(past)  # causal (L, S)
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask)
            if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, past + seq):
                raise ValueError(f"attention_mask must be (batch, cached + seq) = ({batch}, {past + seq}), "
                                 f"got {tuple(attention_mask.shape)}")
            mask = mask & padding_mask(attention_mask)  # and not padding: (batch, 1, L, S)
        x = self.embed_tokens(input_ids)  # (batch, L, d_model); no position embedding
        cos, sin = rope_frequencies(c.head_dim, position_ids, c.rope_theta)  # (batch or 1, L, head_dim)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, index)
        logits = self.lm_head(self.norm(x))  # (batch, L, vocab)
        return logits if cache is None else (logits, cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding: append ``max_new_tokens`` tokens, each the argmax of the next-token logits.

        With ``use_cache`` the prompt is run once (prefill) and each new token is a one-position forward pass
        that reads the cached keys and values (decode, eq. (kv-decode)); without it the whole sequence is run
        again at every step. Both give the same tokens. A left-padded batch is fine: positions count real
        tokens only (as Hugging Face's ``generate``). No stopping at an end-of-sequence token.

        Returns:
            (batch, seq + max_new_tokens) token ids.
        """
        check_tensor("input_ids", input_ids, kind="int", ndim=2)
        check_int("max_new_tokens", max_new_tokens, min=0)
        check_bool("use_cache", use_cache)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        attention_mask = attention_mask.long()
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # m = number of real tokens before, (batch, L)
        was_training = self.training
        self.eval()
        ids, cache, step_ids, step_positions = input_ids, KVCache() if use_cache else None, input_ids, positions
        for _ in range(max_new_tokens):
            if use_cache:  # prefill on the first step, then decode one position against the cache
                logits, cache = self(step_ids, attention_mask, cache, step_positions)
            else:  # the whole sequence again
                logits = self(ids, attention_mask, None, positions)
            next_id = logits[:, -1].argmax(-1, keepdim=True)  # greedy, (batch, 1)
            ids = torch.cat((ids, next_id), dim=1)
            attention_mask = torch.cat((attention_mask, torch.ones_like(next_id)), dim=1)
            step_ids, step_positions = next_id, positions[:, -1:] + 1  # the new token's position, (batch, 1)
            positions = torch.cat((positions, step_positions), dim=1)
        self.train(was_training)
        return ids
