"""lightlm.bpe against Hugging Face: the byte map and the pre-tokenizer against ``tokenizers``' ByteLevel, training
against ``tokenizers``' BpeTrainer, encoding against a ``tokenizers`` BPE model and against SmolLM2's own tokenizer.
"""

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightlm import bpe

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

SENTENCES = [
    "The price rose 12.5% to $1,234 in 2023, didn't it?",
    "  Leading spaces and   gaps\n\nnew lines\ttabs ",
    "Zürich's naïve café: 3°C — “quoted” …",
    "机器学习很有趣。",
    "emoji 🙂👍🏽 and CamelCaseWords_with_underscores",
    "don't I'll we've THEY'RE",
]
# A mixed alphabet: ASCII, accents, CJK, an emoji, white space; few symbols, so training meets many ties.
CHARS = list(string.ascii_letters[:6] + string.digits[:3] + " ,.'!\n\t") + ["é", "€", "机", "器", "🙂"]
TEXTS = st.text(st.sampled_from(CHARS), max_size=80)
NEWS = ("The council said on Tuesday that the new bridge would open in 2026, two years later than planned. "
        "Residents said they had waited long enough; the council's spokesman said the delay was the builder's.")


def hf_trained(text, n_merges):
    """Hugging Face's trainer on the same text, pre-tokenizer and byte alphabet."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def hf_merges(tokenizer):
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def test_byte_map_is_hugging_faces_alphabet():
    table = bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


@pytest.mark.parametrize("text", SENTENCES)
def test_pretokenizer_matches_hugging_faces_byte_level(text):
    pieces = bpe.pretokenize(text)
    assert "".join(pieces) == text
    theirs = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    table = bpe.bytes_to_unicode()
    assert ["".join(table[b] for b in piece.encode()) for piece in pieces] == [piece for piece, _ in theirs]


@pytest.mark.parametrize("n_merges", [0, 1, 40, 120])
def test_training_learns_hugging_faces_merges_and_ids(n_merges):
    merges = bpe.train(NEWS * 3, n_merges)
    reference = hf_trained(NEWS * 3, n_merges)
    assert merges == hf_merges(reference)
    assert bpe.ByteBPE(merges).vocab == reference.get_vocab()


def test_training_merges_the_most_frequent_pair_first():
    # "ab" occurs 3 times, "cd" twice: (a, b) is learnt first, then (c, d); then the pieces are single symbols
    assert bpe.train("ab ab ab cd cd", 10) == [("a", "b"), ("c", "d"), ("Ġ", "ab"), ("Ġ", "cd")]
    assert bpe.train("ab", 0) == [] and bpe.train("", 5) == []


@pytest.mark.parametrize("text", SENTENCES)
def test_encoding_matches_a_hugging_face_bpe_model_with_the_same_merges(text):
    merges = bpe.train(NEWS, 150)
    ours = bpe.ByteBPE(merges)
    reference = Tokenizer(models.BPE(vocab=ours.vocab, merges=merges))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert ours.encode(text) == reference.encode(text).ids
    assert ours.decode(ours.encode(text)) == text


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from lightlm import zoo
    from tests.conftest import require_warm

    require_warm(zoo.smollm2_cache_path(), zoo.smollm2_inputs())
    return AutoTokenizer.from_pretrained(zoo.smollm2_cache_path(), local_files_only=True)


@pytest.mark.parametrize("text", SENTENCES)
def test_smollm2_merges_reproduce_smollm2_token_ids(smol_tokenizer, text):
    ours = bpe.ByteBPE.from_hf(smol_tokenizer)
    assert ours.encode(text) == smol_tokenizer(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text == smol_tokenizer.decode(ours.encode(text))


@settings(max_examples=60)
@given(text=TEXTS, n_merges=st.integers(0, 30))
def test_training_matches_hugging_face_on_random_text(text, n_merges):
    assert bpe.train(text, n_merges) == hf_merges(hf_trained(text, n_merges))


@settings(max_examples=60)
@given(training=TEXTS, text=TEXTS)
def test_decoding_inverts_encoding(training, text):
    tokenizer = bpe.ByteBPE(bpe.train(training, 20))
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=60)
@given(text=TEXTS, n_merges=st.integers(0, 30))
def test_a_trained_tokenizer_saves_a_token_per_merge_on_its_training_text(text, n_merges):
    merges = bpe.train(text, n_merges)
    ids = bpe.ByteBPE(merges).encode(text)
    # each learnt merge joined at least one pair of the training text, so saved at least one token
    assert len(ids) <= len(text.encode()) - len(merges)


def test_rejects_bad_inputs():
    with pytest.raises(TypeError, match="text must be a str"):
        bpe.train(b"bytes", 3)
    with pytest.raises(TypeError, match="n_merges must be an int"):
        bpe.train("text", 2.0)
    with pytest.raises(ValueError, match="n_merges must be >= 0"):
        bpe.train("text", -1)
    with pytest.raises(TypeError, match="merges must be a list"):
        bpe.ByteBPE("a b")
    with pytest.raises(ValueError, match="two non-empty strings"):
        bpe.ByteBPE([("a",)])
    with pytest.raises(ValueError, match="outside the 256 byte symbols"):
        bpe.ByteBPE([("a", "☃")])
    with pytest.raises(TypeError, match="vocab must be a dict"):
        bpe.ByteBPE([], vocab=[("a", 0)])
    tokenizer = bpe.ByteBPE([("a", "b")])
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(42)
    with pytest.raises(TypeError, match="ids must be a list of ints"):
        tokenizer.decode("ab")
    with pytest.raises(TypeError, match="id must be an int"):
        tokenizer.decode([True])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([10**6])
    with pytest.raises(ValueError, match="not in vocab"):
        bpe.ByteBPE([("a", "b")], vocab={"a": 0, "b": 1}).encode("ab")
    with pytest.raises(TypeError, match="fast tokenizer"):
        bpe.ByteBPE.from_hf(object())


def test_from_hf_refuses_a_tokenizer_that_is_not_byte_level_bpe():
    from transformers import PreTrainedTokenizerFast

    word_piece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="model must be BPE"):
        bpe.ByteBPE.from_hf(PreTrainedTokenizerFast(tokenizer_object=word_piece))
    no_regex = Tokenizer(models.BPE())
    no_regex.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(ValueError, match="pre-tokenizer must be ByteLevel"):
        bpe.ByteBPE.from_hf(PreTrainedTokenizerFast(tokenizer_object=no_regex))
