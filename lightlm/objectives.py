"""Pre-training objectives: masked-language-model masking and the causal-LM loss (chapter 4,
"Pre-training").

* :func:`mlm_mask` — BERT's masking scheme (Devlin et al. 2019), eq. (mlm): each eligible token is chosen with
  probability p = 0.15; a chosen token becomes [MASK] with probability 0.8, a uniformly random token with
  probability 0.1 and stays as it is with probability 0.1; the loss is taken at the chosen positions only.
* :func:`shift_for_causal_lm` and :func:`causal_lm_loss` — the causal (next-token) objective, eq. (clm):
  L = −(1/N) Σ_{b,t} log p(x_{b,t+1} | x_{b,≤t}), the mean over the N non-padding target tokens of the whole
  batch, which is what a Hugging Face causal LM returns when called with ``labels=``.

``-100`` is the label PyTorch's ``cross_entropy`` ignores by default, and Hugging Face's convention for "no loss
here".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_int, check_real, check_tensor

__all__ = ["mlm_mask", "shift_for_causal_lm", "causal_lm_loss"]

IGNORE_INDEX = -100


def _check_mask(mask: torch.Tensor | None, input_ids: torch.Tensor, name: str) -> torch.Tensor | None:
    """A boolean copy of ``mask`` after checking it has ``input_ids``'s shape (None stays None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != input_ids.shape:
        raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
    return mask.to(device=input_ids.device) != 0


def mlm_mask(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    special_tokens_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 masking for masked-language-model pre-training (chapter 4, eq. (mlm)).

    Args:
        input_ids: token ids of any shape, usually (batch, seq). Not modified.
        mask_token_id: id of the [MASK] token, in [0, vocab_size).
        vocab_size: size V of the vocabulary; random replacements are drawn uniformly from [0, V).
        mlm_probability: probability p in (0, 1) that an eligible token is chosen for prediction.
        special_tokens_mask: nonzero/True where a token is special ([CLS], [SEP] ...): never chosen. As the
            tokenizer returns it with ``return_special_tokens_mask=True``.
        attention_mask: zero/False at padding: never chosen.
        generator: a ``torch.Generator`` to make the draw reproducible (on ``input_ids``' device).

    Returns:
        ``(masked_input_ids, labels)``: the corrupted ids the model reads, and labels holding the original id
        at every chosen position and -100 elsewhere (so the loss covers exactly the chosen tokens). As in
        BERT and Hugging Face's ``DataCollatorForLanguageModeling``, a random replacement may by chance be the
        original token or a special one (probability 1/V each).
    """
    check_tensor("input_ids", input_ids, kind="int")
    check_int("vocab_size", vocab_size, min=1)
    check_int("mask_token_id", mask_token_id)
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be a token of the vocabulary, in [0, {vocab_size}), got {mask_token_id}")
    check_real("mlm_probability", mlm_probability, min=0, max=1, min_open=True, max_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    special = _check_mask(special_tokens_mask, input_ids, "special_tokens_mask")
    attended = _check_mask(attention_mask, input_ids, "attention_mask")

    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    if special is not None:
        eligible &= ~special  # never [CLS], [SEP], ...
    if attended is not None:
        eligible &= attended  # never padding

    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = eligible & (draw < mlm_probability)  # P(chosen) = p = 0.15 for each eligible token
    how = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # one draw decides 80/10/10
    to_mask = chosen & (how < 0.8)  # 80 % of the chosen → [MASK]
    to_random = chosen & (how >= 0.8) & (how < 0.9)  # 10 % → a random token; the last 10 % stay unchanged
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device,
                               dtype=input_ids.dtype)  # uniform on [0, V)

    masked_input_ids = input_ids.clone()  # the caller's tensor is left as it is
    masked_input_ids[to_mask] = mask_token_id
    masked_input_ids[to_random] = random_ids[to_random]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[chosen] = input_ids[chosen]  # predict the original token at the chosen positions only
    return masked_input_ids, labels


def shift_for_causal_lm(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the causal-LM objective (chapter 4, eq. (clm)).

    Position t reads x_{≤t} and is trained to predict x_{t+1}: ``inputs = input_ids[:, :-1]`` and
    ``targets = input_ids[:, 1:]``, with ``ignore_index`` where the target is padding (attention_mask == 0).

    Args:
        input_ids: (batch, seq) token ids, seq >= 2. Ids already equal to ``ignore_index`` (Hugging Face
            labels) stay ignored.
        attention_mask: (batch, seq), zero at padding; None means no padding.

    Returns:
        ``(inputs, targets)``, each (batch, seq − 1).
    """
    check_tensor("input_ids", input_ids, kind="int")
    check_int("ignore_index", ignore_index)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens per sequence to predict a next one, got seq = {input_ids.shape[1]}")
    attended = _check_mask(attention_mask, input_ids, "attention_mask")
    inputs = input_ids[:, :-1]  # x_1 ... x_{T-1}
    targets = input_ids[:, 1:].clone()  # x_2 ... x_T: the token after each input position
    if attended is not None:
        targets[~attended[:, 1:]] = ignore_index  # no loss for predicting padding
    return inputs, targets


def causal_lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's non-padding targets (chapter 4, eq. (clm)).

    Equals the ``loss`` a Hugging Face causal LM returns for ``labels=input_ids`` with -100 at padding: one
    mean over all target tokens of the batch, so a long sequence weighs more than a short one (not a mean of
    per-sequence means). As there, the logits are upcast to float32 first.

    Args:
        logits: (batch, seq, vocab), the model's output for ``input_ids`` (position t scores token t + 1).
        input_ids: (batch, seq) the same ids the model read (or Hugging Face labels with -100 already set).
        attention_mask: (batch, seq), zero at padding; None means no padding.

    Returns:
        a scalar tensor, in nats per token (exp of it is the perplexity).
    """
    check_tensor("logits", logits, kind="float")
    check_tensor("input_ids", input_ids, kind="int")
    if logits.ndim != 3 or input_ids.ndim != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits must be (batch, seq, vocab) and input_ids (batch, seq) with the same batch and "
                         f"seq, got {tuple(logits.shape)} and {tuple(input_ids.shape)}")
    _, targets = shift_for_causal_lm(input_ids, attention_mask, ignore_index)  # (batch, seq − 1)
    if not (targets != ignore_index).any():
        raise ValueError("every target is padding or ignored: the mean loss over zero tokens is undefined")
    vocab = logits.shape[-1]
    scores = logits[:, :-1].float().reshape(-1, vocab)  # position t scores x_{t+1}: (batch·(seq − 1), vocab)
    # L = −(1/N) Σ log softmax(z_t)[x_{t+1}], N = number of targets that are not ignore_index
    return F.cross_entropy(scores, targets.reshape(-1), ignore_index=ignore_index, reduction="mean")
