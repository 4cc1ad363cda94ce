"""lightlm.prompting: cached label-word scores equal the full prompt run in one piece (a small random Llama with
SmolLM2's tokenizer), and length-grouped batches hold every sentence once with less padding."""

import pytest
import torch

from lightlm import prompting


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lightlm import zoo
    from tests.conftest import require_warm

    require_warm(zoo.smollm2_cache_path(), zoo.smollm2_inputs())
    return AutoTokenizer.from_pretrained(zoo.smollm2_cache_path(), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


PARTS = ["\n\nReview: a quiet, lovely film.\nSentiment:", "\n\nReview: dull.\nSentiment:",
         "\n\nReview: the plot never recovers from its first, long and confusing hour.\nSentiment:"]
WORDS = [" negative", " positive"]


def test_cached_scores_equal_the_full_prompt(tiny_llama, tokenizer):
    prefix = "Classify the sentiment of each movie review as positive or negative."
    scores = prompting.score_label_words(tiny_llama, tokenizer, prefix, PARTS, WORDS, batch_size=2)
    assert scores.shape == (3, 2)
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    for row, part in enumerate(PARTS):
        ids = torch.tensor([tokenizer(prefix + part, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            full = tiny_llama(ids).logits[0, -1].log_softmax(-1)[word_ids]
        torch.testing.assert_close(scores[row], full, rtol=1e-5, atol=1e-5)


def test_score_label_words_rejects_bad_inputs(tiny_llama, tokenizer):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prompting.score_label_words("model", tokenizer, "p", PARTS, WORDS)
    with pytest.raises(TypeError, match="prefix must be a non-empty str"):
        prompting.score_label_words(tiny_llama, tokenizer, "", PARTS, WORDS)
    with pytest.raises(TypeError, match="parts must be a list of str"):
        prompting.score_label_words(tiny_llama, tokenizer, "p", "one part", WORDS)
    with pytest.raises(ValueError, match="parts must not be empty"):
        prompting.score_label_words(tiny_llama, tokenizer, "p", [], WORDS)
    with pytest.raises(ValueError, match="each label word must be one token"):
        prompting.score_label_words(tiny_llama, tokenizer, "p", PARTS, [" negative", " unconvincingly"])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        prompting.score_label_words(tiny_llama, tokenizer, "p", PARTS, WORDS, batch_size=0)


def test_length_grouped_batches_hold_every_sentence_once_with_less_padding(tokenizer):
    texts = [("word " * (1 + (7 * i) % 23)).strip() for i in range(40)]
    labels = torch.arange(40)
    batches = prompting.length_grouped_batches(tokenizer, texts, labels, batch_size=8, seed=0)
    assert len(batches) == 5
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(40))
    for encoding, y in batches:  # each row is its text, padded on the right
        for row, label in zip(encoding["input_ids"], y.tolist()):
            assert tokenizer.decode(row[row != tokenizer.pad_token_id]) == texts[label]
    grouped = sum(e["input_ids"].numel() for e, _ in batches)
    in_order = sum(tokenizer(texts[i:i + 8], padding=True, return_tensors="pt")["input_ids"].numel()
                   for i in range(0, 40, 8))
    assert grouped < in_order
    again = prompting.length_grouped_batches(tokenizer, texts, labels, batch_size=8, seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_length_grouped_batches_reject_bad_inputs(tokenizer):
    with pytest.raises(TypeError, match="texts must be a list of str"):
        prompting.length_grouped_batches(tokenizer, "text", torch.zeros(1))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        prompting.length_grouped_batches(tokenizer, ["a"], [0])
    with pytest.raises(ValueError, match="labels must have shape"):
        prompting.length_grouped_batches(tokenizer, ["a", "b"], torch.zeros(3))
    with pytest.raises(TypeError, match="batch_size must be an int"):
        prompting.length_grouped_batches(tokenizer, ["a"], torch.zeros(1), batch_size=2.0)
