"""Byte-level byte-pair encoding (字节对编码, BPE) from scratch (chapter 4, section "Subword tokens").

BPE (Sennrich et al. 2016) builds a vocabulary bottom-up: start from single symbols, count every adjacent pair
in the training text, add the most frequent pair as a new symbol, repeat. The list of merges, in the order they
were learnt, *is* the tokenizer. GPT-2 made it byte-level (Radford et al. 2019), the scheme of GPT-2, Llama 3 and
SmolLM2:

1. the text's UTF-8 bytes are the base symbols (256 of them, so nothing is ever out of vocabulary), each shown as
   a printable character by :func:`bytes_to_unicode` (the space byte becomes ``Ġ``);
2. a regular expression (:data:`GPT2_PATTERN`) first splits the text into words, numbers, punctuation runs and
   spaces (the *pre-tokenizer*); merges never cross these boundaries, and a leading space sticks to its word;
3. in each piece, the adjacent pair with the lowest *rank* (the earliest learnt merge) is merged, again and
   again, until no pair of the piece is in the table; the resulting symbols are looked up in the vocabulary.

:func:`train` learns merges; :class:`ByteBPE` encodes and decodes with a merges table, its own or a real
tokenizer's (:meth:`ByteBPE.from_hf`). Only torch and numpy are imported at load time: the pre-tokenizer needs
the ``regex`` package (for ``\\p{L}``, any letter), imported inside :func:`pretokenize`.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from functools import lru_cache

from ._checks import check_int

__all__ = ["GPT2_PATTERN", "bytes_to_unicode", "pretokenize", "train", "ByteBPE"]

# The pre-tokenizer of GPT-2 and of Hugging Face's ByteLevel(use_regex=True): English contractions, a word of
# letters, a number, a run of other symbols (each optionally after one space), then runs of white space.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte 0..255 to a printable character: printable Latin-1 bytes map to themselves,
    the other 68 (controls, space, ...) to the characters 256, 257, ... in byte order, so ``" "`` → ``"Ġ"``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _check_text(name: str, text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


def pretokenize(text: str, pattern: str = GPT2_PATTERN) -> list[str]:
    """Split ``text`` into the pieces BPE works on separately (step 2 above); ``"".join`` of them is ``text``."""
    import regex  # a transformers dependency; only the pre-tokenizer needs it

    _check_text("text", text)
    _check_text("pattern", pattern)
    return regex.findall(pattern, text)


def _to_symbols(piece: str) -> str:
    """A piece of text as the printable characters of its UTF-8 bytes (step 1)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in piece.encode("utf-8"))


def _alphabet() -> list[str]:
    """The 256 byte symbols in Hugging Face's order (by code point), which fixes the ids 0..255 of :func:`train`."""
    return sorted(bytes_to_unicode().values())


def train(text: str, n_merges: int, pattern: str = GPT2_PATTERN) -> list[tuple[str, str]]:
    """Learn up to ``n_merges`` byte-level BPE merges from ``text`` (Sennrich et al. 2016).

    Each step adds the most frequent adjacent pair of symbols, counted inside the pre-tokenized pieces and
    weighted by how often each piece occurs. Ties are broken deterministically by the smaller pair of ids, where
    the 256 byte symbols have ids 0..255 in code-point order of their printable characters and each new symbol
    the next id: the rule of Hugging Face's ``BpeTrainer``, so the two learn the same table. Training stops early
    when no pair is left (every piece is a single symbol).

    Returns:
        the merges in the order learnt, as pairs of symbol strings (``("Ġ", "t")``); their index is their rank.
    """
    _check_text("text", text)
    n_merges = check_int("n_merges", n_merges, min=0)
    symbol_id = {symbol: i for i, symbol in enumerate(_alphabet())}
    symbols = list(symbol_id)  # id -> symbol
    piece_counts = Counter(_to_symbols(piece) for piece in pretokenize(text, pattern))
    words = [[symbol_id[c] for c in piece] for piece in piece_counts]  # each piece as a list of ids
    counts = list(piece_counts.values())
    pair_counts: Counter = Counter()
    where = defaultdict(set)  # pair -> indices of the words that contain it
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]  # most frequent first, then smallest ids
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < n_merges:
        negative_count, pair = heapq.heappop(heap)
        if -negative_count != pair_counts[pair]:  # stale entry: the count fell since it was pushed
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            continue
        if pair_counts[pair] < 1:
            break
        left, right = pair
        merged = symbols[left] + symbols[right]
        if merged not in symbol_id:  # (a rare second route to an existing symbol reuses its id)
            symbol_id[merged] = len(symbols)
            symbols.append(merged)
        new_id = symbol_id[merged]
        merges.append((symbols[left], symbols[right]))
        grown = set()
        for w in sorted(where[pair]):
            word, count = words[w], counts[w]
            for old in zip(word, word[1:]):
                pair_counts[old] -= count
            words[w] = word = _merge(word, pair, new_id)
            for new in zip(word, word[1:]):
                pair_counts[new] += count
                where[new].add(w)
                grown.add(new)
        for new in grown:  # pairs that may have grown need a fresh heap entry
            if pair_counts[new] > 0:
                heapq.heappush(heap, (-pair_counts[new], new))
    return merges


def _merge(word: list, pair: tuple, new) -> list:
    """Replace every non-overlapping occurrence of ``pair`` in ``word``, left to right, by ``new``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class ByteBPE:
    """A byte-level BPE tokenizer given its merges (and optionally its vocabulary).

    Args:
        merges: pairs of symbol strings in rank order (as :func:`train` returns, or as a ``tokenizer.json`` lists
            them; ``"a b"`` strings are accepted too).
        vocab: symbol -> id. Default: the 256 byte symbols (ids 0..255, :func:`train`'s order), then each merge's
            result in order, the ids :func:`train` assigns. A real vocabulary may lack bytes that never occur in
            UTF-8 text (SmolLM2's lacks 21, such as 0xC0); encoding a text that needs one is a ValueError.
        pattern: the pre-tokenizer's regular expression.
    """

    def __init__(self, merges, vocab: dict | None = None, pattern: str = GPT2_PATTERN):
        if isinstance(merges, (str, bytes)) or not hasattr(merges, "__iter__"):
            raise TypeError(f"merges must be a list of (left, right) pairs, got {type(merges).__name__}")
        pairs = []
        for merge in merges:
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2 or not all(isinstance(part, str) and part for part in pair):
                raise ValueError(f"each merge must be two non-empty strings, got {merge!r}")
            pairs.append(pair)
        alphabet = set(bytes_to_unicode().values())
        for pair in pairs:
            if not set("".join(pair)) <= alphabet:
                raise ValueError(f"merge {pair!r} has characters outside the 256 byte symbols")
        if vocab is None:
            vocab = {symbol: i for i, symbol in enumerate(_alphabet())}
            for left, right in pairs:
                vocab.setdefault(left + right, len(vocab))
        elif not isinstance(vocab, dict):
            raise TypeError(f"vocab must be a dict from symbol to id or None, got {type(vocab).__name__}")
        if not all(isinstance(symbol, str) and isinstance(i, int) for symbol, i in vocab.items()):
            raise TypeError("vocab must map str symbols to int ids")
        self.merges = pairs
        self.ranks = {pair: rank for rank, pair in enumerate(pairs)}  # lower rank = learnt earlier = merged first
        self.vocab = dict(vocab)
        self.symbols = {i: symbol for symbol, i in self.vocab.items()}  # id -> symbol
        self.pattern = _check_text("pattern", pattern)

    @classmethod
    def from_hf(cls, tokenizer) -> "ByteBPE":
        """Read merges, vocabulary and pre-tokenizer from a Hugging Face fast tokenizer (its ``tokenizer.json``).

        Supported: a ``BPE`` model behind a ``ByteLevel`` pre-tokenizer with ``use_regex=True`` (GPT-2's
        pattern) and ``add_prefix_space=False``, no normalizer, the setup of GPT-2 and SmolLM2. Added special
        tokens (``<|im_start|>`` ...) are not recognised in text.
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise TypeError(f"tokenizer must be a Hugging Face fast tokenizer, got {type(tokenizer).__name__}")
        spec = json.loads(backend.to_str())
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"the tokenizer's model must be BPE, got {model.get('type')!r}")
        if spec.get("normalizer") is not None:
            raise ValueError(f"a normalizer is not supported, got {spec['normalizer'].get('type')!r}")
        if (pre.get("type"), pre.get("use_regex"), pre.get("add_prefix_space")) != ("ByteLevel", True, False):
            raise ValueError("the pre-tokenizer must be ByteLevel(use_regex=True, add_prefix_space=False), "
                             f"got {pre!r}")
        return cls(model["merges"], model["vocab"], GPT2_PATTERN)

    def tokens(self, text: str) -> list[str]:
        """The symbols of ``text``: pre-tokenize, map bytes to symbols, then merge by rank in each piece."""
        _check_text("text", text)
        out = []
        for piece in pretokenize(text, self.pattern):
            word = list(_to_symbols(piece))
            while len(word) > 1:
                pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
                if pair not in self.ranks:  # no pair of this piece is a merge any more
                    break
                word = _merge(word, pair, pair[0] + pair[1])  # the lowest-ranked pair, everywhere in the piece
            out += word
        return out

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        try:
            return [self.vocab[symbol] for symbol in self.tokens(text)]
        except KeyError as error:
            raise ValueError(f"the merges produce the symbol {error.args[0]!r}, which is not in vocab") from None

    def decode(self, ids) -> str:
        """The text of a list of ids (bytes that are not valid UTF-8 become U+FFFD)."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"ids must be a list of ints, got {type(ids).__name__}")
        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        data = bytearray()
        for i in ids:
            i = check_int("id", i)
            if i not in self.symbols:
                raise ValueError(f"id {i} is not in the vocabulary ({len(self.vocab)} ids)")
            symbol = self.symbols[i]
            if not all(char in to_byte for char in symbol):
                raise ValueError(f"id {i} is the special token {symbol!r}, which has no bytes")
            data += bytes(to_byte[char] for char in symbol)
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return len(self.vocab)
