"""lightlm.artefacts.rt_adapters and lora_lm: chapter 12's cached runs. The method switch trains exactly what each
method names (counted against closed forms on a tiny BERT), one run of the recipe on a few sentences leaves every
frozen weight untouched and stores what it trained, SmolLM2's answer loss equals the language model's own
cross-entropy at the answer token, and the cached results agree with their own predictions, adapters and files."""

import math

import pytest
import torch
from conftest import tiny_hf

from lightlm import adapters, artefacts, lora, lora_io, qlora
from lightlm.artefacts import lora_lm, rt_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bert():
    return tiny_hf("bert")


@pytest.mark.parametrize("method", list(rt_adapters.METHODS))
def test_each_method_trains_what_it_names(method):
    model = _tiny_bert()
    names = dict(model.named_parameters())
    report = rt_adapters.apply_method(model, method)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    d, layers, head = 32, 2, 32 * 2 + 2
    kind, size = rt_adapters.METHODS[method]
    if kind == "head":
        assert trained == {n for n in names if n.startswith(("bert.pooler", "classifier"))}
    elif kind == "bitfit":
        assert trained == {n for n in names if n.endswith("bias")} | {"classifier.weight"}
    elif kind == "houlsby":
        norms = (2 * layers + 1) * 2 * d
        assert report["trainable"] == layers * 2 * (2 * d * size + d + size) + norms + head
    elif kind == "lora":
        assert report["trainable"] == 2 * layers * size * (d + d) + head
        assert set(lora.lora_layers(model)) == {f"bert.encoder.layer.{i}.attention.self.{m}"
                                                for i in range(layers) for m in ("query", "value")}
    else:
        assert trained == set(names)
    assert report["trainable"] == adapters.trainable_parameters(model)[0]


def test_methods_and_artefacts_are_registered():
    with pytest.raises(ValueError, match="method must be one of"):
        rt_adapters.apply_method(_tiny_bert(), "prefix tuning")
    assert artefacts.ARTEFACTS["rt-adapters"][1] == (rt_adapters.rt_adapters_path().name,)
    assert artefacts.ARTEFACTS["lora-lm"][1] == (lora_lm.lora_lm_path().name,)


@pytest.mark.slow
def test_one_run_of_the_recipe_keeps_frozen_weights_and_stores_what_it_trained(tmp_path, monkeypatch):
    from lightlm import data

    monkeypatch.setitem(rt_adapters.SETTINGS, "epochs", 1)
    rt = data.rotten_tomatoes()
    texts = {split: (list(rt[name]["text"][:48]), list(rt[name]["label"][:48]))
             for split, name in (("labelled", "train"), ("validation", "validation"), ("test", "test"))}
    run = rt_adapters._run("LoRA r = 1", 0, 1e-3, texts, tmp_path / "adapter", progress=False)  # checks frozen weights
    assert run["bytes"] == lora_io.adapter_nbytes(tmp_path / "adapter")
    assert len(run["losses"]) == 2 and 0 <= run["test"] <= 1 and run["trainable"] < run["total"]
    # the bytes of a PEFT folder: one float32 per trained parameter, plus the safetensors header and config
    assert 4 * run["trainable"] < run["bytes"] < 4 * run["trainable"] + 20_000


def _tiny_llama():
    return tiny_hf("llama")


def test_the_answer_loss_is_the_language_models_cross_entropy_at_the_answer_token():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 9, 7])
    ids = torch.randint(1, 50, (3, 9), generator=g)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0  # right padding
    targets = torch.tensor([4, 17, 33])
    with torch.no_grad():
        mask = (torch.arange(9) < lengths[:, None]).long()
        got = lora_lm._answer_loss(model, (ids, mask, targets))
        expected = sum(-model(ids[row:row + 1, :n]).logits[0, -1].log_softmax(-1)[targets[row]]
                       for row, n in enumerate(lengths)) / 3
    torch.testing.assert_close(got, expected)


def test_the_held_out_reviews_are_the_seeded_shuffle_of_the_test_split():
    from lightlm import data

    texts, labels = lora_lm.heldout_reviews(5)
    test = data.rotten_tomatoes()["test"].shuffle(seed=0)
    assert texts == list(test["text"][:5]) and labels.tolist() == list(test["label"][:5])


def test_the_cached_method_table_holds_both_seeds_and_the_kept_adapter_loads(minilm):
    from conftest import require_warm

    require_warm(rt_adapters.rt_adapters_path(), rt_adapters.rt_adapters_inputs())
    table = rt_adapters.load_rt_adapters(progress=False)
    runs = table["runs"]
    assert set(runs) == set(rt_adapters.METHODS)
    for method, by_seed in runs.items():
        assert set(by_seed) == {"0", "1"}, method
        assert all(len(run["losses"]) == 126 for run in by_seed.values())
        assert by_seed["0"]["trainable"] == by_seed["1"]["trainable"]
    full = runs["full fine-tuning"]["0"]
    assert full["trainable"] == full["total"] and abs(full["bytes"] - 4 * full["total"]) < 100_000
    assert runs["LoRA r = 4"]["0"]["bytes"] == lora_io.adapter_nbytes(table["adapter"])
    _, model = rt_adapters.make_model(0)
    lora_io.load_adapter(model, table["adapter"])
    assert adapters.trainable_parameters(model)[0] == runs["LoRA r = 4"]["0"]["trainable"]


def test_the_cached_smollm2_runs_agree_with_their_predictions_and_files(smollm2):
    from conftest import require_warm

    require_warm(lora_lm.lora_lm_path(), lora_lm.lora_lm_inputs())
    runs = lora_lm.load_lora_lm(progress=False)
    _, labels = lora_lm.heldout_reviews()
    for base in ("fp32", "nf4"):
        run = runs[base]
        for when in ("before", "after"):
            predicted = torch.tensor(run[f"predictions_{when}"])
            assert math.isclose(run[when], (predicted == labels).float().mean().item())
            assert math.isclose(run[f"{when}_positive"], predicted.float().mean().item())
        assert run["adapter_bytes"] == lora_io.adapter_nbytes(runs["folder"] / f"lora-{base}")
        assert len(run["losses"]) == lora_lm.SETTINGS["steps"] and len(run["samples_after"]) == 4
        assert run["trainable"] == lora.lora_param_count(576, 576, 8, 30) + lora.lora_param_count(576, 192, 8, 30)
    _, model = smollm2
    fp32_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert runs["fp32"]["bytes"] == runs["nf4"]["bytes_fp32"] == fp32_bytes
    copy_ = __import__("copy").deepcopy(model)
    report = qlora.quantize_nf4(copy_, block_size=64, double_quant=True)
    assert runs["nf4"]["bytes"] == fp32_bytes - report["bytes_before"] + report["bytes_after"]
