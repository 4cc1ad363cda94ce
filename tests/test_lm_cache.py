"""lightlm.lm_cache: chapter 6's cached teacher outputs, built here on a tiny configuration in a temporary cache."""

import json
import subprocess
import sys

import pytest
import torch

from lightlm import distill, lm_cache, zoo

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = lm_cache.LMCacheConfig(seq_len=8, n_train=4, n_heldout=2, k=5, n_generations=2, prompt_len=3,
                              batch_size=2)


@pytest.fixture(scope="module")
def tiny_cache(smollm2, tmp_path_factory):
    """A tiny cache built with the session's SmolLM2 under a temporary LIGHTLM_CACHE; zoo.load_smollm2 is
    patched to hand back that copy, so a rebuild never loads or converts the model again."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTLM_CACHE", str(tmp_path_factory.mktemp("lightlm-cache")))
        patch.setattr(zoo, "load_smollm2", lambda progress=True: smollm2)
        folder = lm_cache.build_lm_cache(TINY, progress=False)
        yield folder, lm_cache.load_lm_cache(TINY, progress=False), patch


def test_cache_round_trip_has_the_configured_shapes_and_dtypes(tiny_cache):
    folder, cache, _ = tiny_cache
    assert folder == lm_cache.cache_path() and folder.is_dir()
    assert cache["train_ids"].shape == (4, 8) and cache["train_ids"].dtype == torch.int32
    assert cache["train_topk_values"].shape == (4, 8, 5) and cache["train_topk_values"].dtype == torch.float16
    assert cache["train_topk_indices"].dtype == torch.int32
    assert cache["heldout_topk_values"].shape == (2, 8, 5)
    assert cache["heldout_target_logprobs"].shape == (2, 7)
    assert cache["generated_ids"].shape == (2, 8)
    assert cache["manifest"]["version"] == lm_cache.VERSION
    assert cache["manifest"]["config"] == json.loads(json.dumps(TINY.__dict__))


def test_cached_topk_equals_topk_teacher_on_the_teachers_logits(smollm2, tiny_cache):
    _, cache, _ = tiny_cache
    _, model = smollm2
    bf16 = cache["manifest"]["bf16_autocast"]
    for first in range(0, 4, TINY.batch_size):  # recompute batch by batch, as the build did
        ids = cache["train_ids"][first:first + TINY.batch_size].long()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        values, indices = distill.topk_teacher(logits, TINY.k)
        torch.testing.assert_close(cache["train_topk_values"][first:first + TINY.batch_size], values.half())
        assert torch.equal(cache["train_topk_indices"][first:first + TINY.batch_size], indices.int())


def test_heldout_target_logprobs_are_the_teachers_log_probs_of_the_next_token(smollm2, tiny_cache):
    _, cache, _ = tiny_cache
    ids = cache["heldout_ids"].long()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                enabled=cache["manifest"]["bf16_autocast"]):
        logits = smollm2[1](input_ids=ids).logits
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(cache["heldout_target_logprobs"], expected)
    assert (cache["heldout_target_logprobs"] <= 0).all()


def test_generations_continue_the_training_windows_prompts(tiny_cache):
    _, cache, _ = tiny_cache
    prompts = cache["train_ids"][:TINY.n_generations, :TINY.prompt_len]
    assert torch.equal(cache["generated_ids"][:, :TINY.prompt_len], prompts)


def test_topk_values_are_log_probabilities_largest_first(tiny_cache):
    _, cache, _ = tiny_cache
    values = cache["train_topk_values"].float()
    assert (values <= 0).all() and (values.diff(dim=-1) <= 0).all()
    assert (values.exp().sum(-1) <= 1 + 1e-2).all()


def test_fresh_cache_is_loaded_not_rebuilt_and_warm_says_so(tiny_cache, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a fresh cache must not be rebuilt")

    monkeypatch.setattr(lm_cache, "build_lm_cache", fail)
    lm_cache.load_lm_cache(TINY, progress=False)
    assert lm_cache.warm_lm_cache(TINY).startswith("cached at")


def test_changed_settings_or_version_rebuild_the_cache(tiny_cache, monkeypatch):
    other = lm_cache.LMCacheConfig(**{**TINY.__dict__, "k": 3})
    assert lm_cache.load_lm_cache(other, progress=False)["train_topk_values"].shape[-1] == 3
    monkeypatch.setattr(lm_cache, "VERSION", lm_cache.VERSION + 1)
    rebuilt = lm_cache.load_lm_cache(TINY, progress=False)
    assert rebuilt["manifest"]["version"] == lm_cache.VERSION and rebuilt["train_topk_values"].shape[-1] == 5
    assert not [p for p in lm_cache.cache_path().parent.iterdir() if ".tmp" in p.name]  # staging is gone


def test_corrupted_tensors_make_the_cache_stale(tiny_cache):
    folder = lm_cache.cache_path()
    with open(folder / "tensors.safetensors", "ab") as handle:
        handle.write(b"junk")
    assert lm_cache.load_lm_cache(TINY, progress=False)["train_ids"].shape == (4, 8)  # rebuilt
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "tensors.safetensors").stat().st_size == manifest["tensors_bytes"]


@pytest.mark.parametrize("bad, error", [
    ({"seq_len": 1}, ValueError), ({"k": 0}, ValueError), ({"k": 50_000}, ValueError),
    ({"prompt_len": 32}, ValueError), ({"n_generations": 2000}, ValueError), ({"temperature": -1.0}, ValueError),
    ({"n_train": 0}, ValueError), ({"seed": -1}, ValueError), ({"batch_size": "8"}, TypeError),
    ({"seq_len": True}, TypeError), ({"k": 2.5}, TypeError),
])
def test_config_rejects_bad_values(bad, error):
    with pytest.raises(error):
        lm_cache.LMCacheConfig(**bad)


def test_builders_reject_a_config_that_is_not_an_lmcacheconfig():
    with pytest.raises(TypeError, match="LMCacheConfig"):
        lm_cache.build_lm_cache({"k": 3})
    with pytest.raises(TypeError, match="LMCacheConfig"):
        lm_cache.load_lm_cache("tiny")


def test_zoo_warm_knows_the_chapter_6_artefact():
    assert "lm-cache" in zoo.ARTEFACTS


def test_importing_the_module_imports_only_torch():
    code = "import sys, lightlm.lm_cache; print(sorted({'transformers', 'safetensors', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
