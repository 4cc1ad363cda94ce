"""lightlm.artefacts.lm_cache: chapter 8's cached teacher outputs, built here on a tiny configuration in a temporary cache."""

import json
import warnings
import subprocess
import sys

import pytest
import torch

from lightlm import _cache, artefacts, distill, zoo
from lightlm.artefacts import lm_cache

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


def test_lm_cache_inputs_are_what_a_current_cache_records(tiny_cache):
    # the artefacts built on the cache record these inputs: they must match a cache that is up to date
    folder, _, _ = tiny_cache
    assert _cache.read_manifest(folder)["inputs"] == _cache._canonical(lm_cache.lm_cache_inputs(TINY))
    assert _cache.inspect(folder, lm_cache.lm_cache_inputs(TINY)) is None
    assert lm_cache.lm_cache_inputs(TINY) != lm_cache.lm_cache_inputs()  # another configuration, other inputs


def test_cache_round_trip_has_the_configured_shapes_and_dtypes(tiny_cache):
    folder, cache, _ = tiny_cache
    assert folder == lm_cache.cache_path(TINY) and folder.is_dir()
    assert folder.name.startswith("smollm2-news-distill-")  # not the chapter's folder: a config of its own
    assert lm_cache.cache_path().name == "smollm2-news-distill"
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
    assert cache["manifest"]["precision"] == "fp32"  # the same cache on any CPU: no bf16 path
    for first in range(0, 4, TINY.batch_size):  # recompute batch by batch, as the build did
        ids = cache["train_ids"][first:first + TINY.batch_size].long()
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        values, indices = distill.topk_teacher(logits, TINY.k)
        torch.testing.assert_close(cache["train_topk_values"][first:first + TINY.batch_size], values.half())
        assert torch.equal(cache["train_topk_indices"][first:first + TINY.batch_size], indices.int())


def test_heldout_target_logprobs_are_the_teachers_log_probs_of_the_next_token(smollm2, tiny_cache):
    _, cache, _ = tiny_cache
    ids = cache["heldout_ids"].long()
    with torch.inference_mode():
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

    monkeypatch.setattr(lm_cache, "_build", fail)
    lm_cache.load_lm_cache(TINY, progress=False)
    assert lm_cache.warm_lm_cache(TINY).startswith("cached at")


def test_changed_settings_or_version_rebuild_the_cache(tiny_cache, monkeypatch):
    other = lm_cache.LMCacheConfig(**{**TINY.__dict__, "k": 3})
    assert lm_cache.load_lm_cache(other, progress=False)["train_topk_values"].shape[-1] == 3
    monkeypatch.setattr(lm_cache, "VERSION", lm_cache.VERSION + 1)
    rebuilt = lm_cache.load_lm_cache(TINY, progress=False)
    assert rebuilt["manifest"]["version"] == lm_cache.VERSION and rebuilt["train_topk_values"].shape[-1] == 5
    assert not [p for p in zoo.cache_dir().iterdir() if ".build-" in p.name]  # staging is gone


def test_corrupted_tensors_make_the_cache_stale(tiny_cache):
    folder = lm_cache.cache_path(TINY)
    with warnings.catch_warnings():  # an earlier test may have left another version: start from a fresh one
        warnings.simplefilter("ignore", zoo.CacheRebuildWarning)
        lm_cache.load_lm_cache(TINY, progress=False)
    with open(folder / "tensors.safetensors", "r+b") as handle:  # same size, one bit flipped
        handle.seek(-3, 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.warns(zoo.CacheRebuildWarning, match="tensors.safetensors failed its SHA-256 check"):
        assert lm_cache.load_lm_cache(TINY, progress=False)["train_ids"].shape == (4, 8)  # rebuilt
    assert _cache.inspect(folder, lm_cache._inputs(TINY, None)) is None


def test_a_teacher_passed_in_is_cached_under_its_own_fingerprint(tiny_cache):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, smollm2_cache, patch = tiny_cache
    tokenizer = zoo.load_smollm2()[0]
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    folder = lm_cache.build_lm_cache(TINY, progress=False, teacher=(tokenizer, other))
    assert folder != lm_cache.cache_path(TINY) and folder.name.startswith("lm-distill-")
    manifest = _cache.read_manifest(folder)
    assert manifest["inputs"]["teacher"] == {"model": "LlamaForCausalLM",
                                             "fingerprint": lm_cache.teacher_fingerprint(other)}
    # SmolLM2's cache is untouched: the same tensors as before
    again = lm_cache.load_lm_cache(TINY, progress=False)
    torch.testing.assert_close(again["train_topk_values"], smollm2_cache["train_topk_values"])
    other_cache = lm_cache.load_lm_cache(TINY, progress=False, teacher=(tokenizer, other))
    assert not torch.equal(other_cache["train_topk_indices"], again["train_topk_indices"])


def test_the_fingerprint_changes_with_any_weight():
    model = torch.nn.Linear(3, 2)
    before = lm_cache.teacher_fingerprint(model)
    assert lm_cache.teacher_fingerprint(model) == before
    with torch.no_grad():
        model.bias[0] += 1e-6
    assert lm_cache.teacher_fingerprint(model) != before
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lm_cache.teacher_fingerprint("smollm2")
    with pytest.raises(TypeError, match="tokenizer, model"):
        lm_cache.cache_path(teacher=model)


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


def test_importing_the_module_imports_only_torch():
    code = "import sys, lightlm.artefacts.lm_cache; print(sorted({'transformers', 'safetensors', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
