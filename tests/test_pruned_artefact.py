"""lightlm.artefacts.pruned_lm: chapter 9's table of SmolLM2 perplexities after pruning. The layer-by-layer driver is
checked against prune_sequential on a whole tiny Llama; the cached table (if warm) against chapter 8's cache."""

import copy
import math

import pytest
import torch

from lightlm import artefacts, prune_calib
from lightlm.artefacts import lm_cache, pruned_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method, target", [("wanda", "0.5"), ("sparsegpt", "0.5"), ("sparsegpt", "2:4"),
                                            ("wanda", "2:4")])
def test_layer_by_layer_pruning_equals_prune_sequential_on_the_whole_model(method, target):
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    goal = pruned_lm.parse_target(target)
    prune_calib.prune_sequential(reference, [{"input_ids": ids, "use_cache": False}], method, **goal, blocksize=8)
    pruned_lm.prune_lm(model, ids, method, target, blocksize=8)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(ours, theirs, msg=name)
        assert torch.equal(ours == 0, theirs == 0), name


def test_magnitude_pruning_reaches_the_target_in_every_linear_of_the_layers():
    model = _tiny_llama()
    head = model.lm_head.weight.detach().clone()
    pruned_lm.prune_lm(model, None, "magnitude", "0.5")
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                assert int((module.weight == 0).sum()) == round(0.5 * module.weight.numel())
    assert torch.equal(model.lm_head.weight, head)  # the embedding / output layer is not pruned
    model = _tiny_llama()
    pruned_lm.prune_lm(model, None, "magnitude", "2:4")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert ((weight != 0).view(weight.shape[0], -1, 4).sum(-1) == 2).all()


def test_heldout_perplexity_is_exp_of_the_mean_next_token_nll():
    model = _tiny_llama()
    ids = torch.randint(0, 40, (5, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1))
    assert math.isclose(pruned_lm.heldout_perplexity(model, ids, batch_size=2), nll.exp().item(), rel_tol=1e-5)


def test_bad_targets_and_methods_raise():
    with pytest.raises(ValueError, match="target must be a sparsity in"):
        pruned_lm.parse_target("1.5")
    with pytest.raises(ValueError, match="1 <= N <= M"):
        pruned_lm.parse_target("4:2")
    with pytest.raises(TypeError, match="target must be a str"):
        pruned_lm.parse_target(0.5)
    with pytest.raises(ValueError, match="method must be one of"):
        pruned_lm.prune_lm(_tiny_llama(), None, "random", "0.5")
    with pytest.raises(TypeError, match="calibration_ids must be"):
        pruned_lm.prune_lm(_tiny_llama(), None, "wanda", "0.5")


def test_the_artefact_is_registered():
    assert "pruned-lm" in artefacts.ARTEFACTS
    assert artefacts.ARTEFACTS["pruned-lm"][1] == (pruned_lm.pruned_lm_path().name,)


def test_the_cached_table_starts_from_chapter_8s_teacher_perplexity():
    from conftest import require_warm

    require_warm(pruned_lm.pruned_lm_path(), pruned_lm.pruned_lm_inputs())
    table = pruned_lm.load_pruned_lm(progress=False)
    cache = lm_cache.load_lm_cache(progress=False)
    teacher = math.exp(-cache["heldout_target_logprobs"].double().mean().item())
    assert math.isclose(table["dense"], teacher, rel_tol=1e-4)
    for method in pruned_lm.SETTINGS["methods"]:  # zeros counted include the few already 0 in the weights
        assert math.isclose(table["sparsity"][method]["0.5"], 0.5, abs_tol=1e-4)
        assert math.isclose(table["sparsity"][method]["2:4"], 0.5, abs_tol=1e-4)
        assert table["perplexity"][method]["0.5"] > table["dense"]
