"""lightlm.prune_structured: a model with heads, neurons or layers sliced away equals the original with those
heads' outputs, those neurons' activations or those layers' residual branches zeroed (hooks on the unchanged
model are the reference), on tiny BERT and Llama configs and on the real MiniLM and SmolLM2."""

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch

from lightlm import prune_structured as ps

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=24, max_position_embeddings=32)
    return BertModel(config).eval()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=4, intermediate_size=20, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _output(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _zeroing(model, where, spec, width=1):
    """Forward pre-hooks on ``where(layer)`` (a Linear) that zero input columns [i·width, (i+1)·width) for i in
    spec[layer]: the original model with those heads' outputs (or neurons' activations) zeroed."""
    layers, _ = ps.transformer_layers(model)
    handles = []
    for index, items in spec.items():
        columns = [i * width + j for i in items for j in range(width)]

        def hook(module, args, columns=columns):
            x = args[0].clone()
            x[..., columns] = 0
            return (x,)
        handles.append(where(layers[index]).register_forward_pre_hook(hook))
    return handles


def _reference(model, where, spec, width=1, ids=IDS):
    handles = _zeroing(model, where, spec, width)
    try:
        return _output(model, ids)
    finally:
        for handle in handles:
            handle.remove()


def _bert_o(layer):
    return layer.attention.output.dense


def _llama_o(layer):
    return layer.self_attn.o_proj


# --------------------------------------------------------------------------- heads


def test_bert_heads_pruned_equal_heads_zeroed():
    model = _tiny_bert()
    spec = {0: [1, 3], 2: [0]}
    expected = _reference(model, _bert_o, spec, width=4)
    assert not torch.allclose(expected, _output(model))
    ps.prune_heads(model, spec)
    torch.testing.assert_close(_output(model), expected)
    assert model.encoder.layer[0].attention.self.query.weight.shape == (8, 16)
    assert model.encoder.layer[0].attention.output.dense.weight.shape == (16, 8)
    assert model.config.pruned_heads == {0: [1, 3], 2: [0]}
    ps.prune_heads(model, {0: [0]})  # indices of the model as it is now: head 0 of the remaining [0, 2]
    assert model.config.pruned_heads[0] == [0, 1, 3]


def test_llama_gqa_query_heads_pruned_consistently_with_their_kv_group():
    model = _tiny_llama()  # 6 query heads on 2 key/value heads: groups {0, 1, 2}, {3, 4, 5}
    spec = {0: [0, 4], 1: [3, 4, 5], 2: [2, 5]}
    expected = _reference(model, _llama_o, spec, width=4)
    ps.prune_heads(model, spec)
    torch.testing.assert_close(_output(model), expected)
    attention = [layer.self_attn for layer in model.model.layers]
    assert [(a.q_proj.out_features // 4, a.k_proj.out_features // 4) for a in attention] == [(4, 2), (3, 1), (4, 2)]
    assert [a.num_key_value_groups for a in attention] == [2, 3, 2]
    assert model.config.num_attention_heads == 6  # layers differ: the uniform fields keep their value
    with pytest.raises(ValueError, match="same number in every remaining group"):
        ps.prune_heads(_tiny_llama(), {0: [0]})


def test_llama_uniform_pruning_updates_the_config_so_from_config_rebuilds_it():
    from transformers import LlamaForCausalLM

    model = _tiny_llama()
    spec = {i: [3, 4, 5] for i in range(3)}  # drop the second key/value group everywhere
    expected = _reference(model, _llama_o, spec, width=4)
    ps.prune_heads(model, spec)
    ps.prune_neurons(model, {i: [0, 7, 19] for i in range(3)})
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 1)
    assert model.config.intermediate_size == 17 and model.config.head_dim == 4
    rebuilt = LlamaForCausalLM(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: every shape matches
    torch.testing.assert_close(_output(rebuilt), _output(model))
    model_heads_only = _tiny_llama()
    torch.testing.assert_close(_output(ps.prune_heads(model_heads_only, spec)), expected)


# --------------------------------------------------------------------------- neurons and layers


@pytest.mark.parametrize("make, down", [(_tiny_bert, lambda layer: layer.output.dense),
                                        (_tiny_llama, lambda layer: layer.mlp.down_proj)])
def test_neurons_pruned_equal_neurons_zeroed(make, down):
    model = make()
    spec = {0: [0, 5, 6], 1: list(range(0, 20, 2))}
    expected = _reference(model, down, spec)
    ps.prune_neurons(model, spec)
    torch.testing.assert_close(_output(model), expected)
    widths = [21, 14, 24] if make is _tiny_bert else [17, 10, 20]
    assert [down(layer).in_features for layer in ps.transformer_layers(model)[0]] == widths
    assert model.config.layer_intermediate_sizes == widths


@pytest.mark.parametrize("make", [_tiny_bert, _tiny_llama])
def test_dropped_layers_equal_layers_skipped(make):
    model = make()
    layers, _ = ps.transformer_layers(model)
    handle = layers[1].register_forward_hook(lambda module, args, output: args[0])  # the layer as identity
    expected = _output(model)
    generated = model.generate(IDS, max_new_tokens=4, do_sample=False) if make is _tiny_llama else None
    handle.remove()
    ps.drop_layers(model, [1])
    torch.testing.assert_close(_output(model), expected)
    assert model.config.num_hidden_layers == 2 and len(layers) == 2
    if make is _tiny_llama:  # the KV cache indexes layers by layer_idx: renumbered, so generation still agrees
        assert [layer.self_attn.layer_idx for layer in layers] == [0, 1]
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), generated)


# --------------------------------------------------------------------------- bad inputs


def test_bad_structured_inputs_raise_clear_errors():
    model = _tiny_bert()
    with pytest.raises(ValueError, match=r"head index 4 is out of range for layer 0, which has 4 heads \(0..3\)"):
        ps.prune_heads(model, {0: [4]})
    with pytest.raises(ValueError, match="layer index 3 is out of range: the model has 3 layers"):
        ps.prune_heads(model, {3: [0]})
    with pytest.raises(ValueError, match="removing all 4 heads of layer 1 leaves nothing; drop the layer"):
        ps.prune_heads(model, {1: [0, 1, 2, 3]})
    with pytest.raises(TypeError, match="heads must be a mapping"):
        ps.prune_heads(model, [0, 1])
    with pytest.raises(TypeError, match="must be an iterable of ints"):
        ps.prune_neurons(model, {0: 3})
    with pytest.raises(ValueError, match="neuron index 24 is out of range"):
        ps.prune_neurons(model, {0: [24]})
    with pytest.raises(ValueError, match="removing all 3 layers"):
        ps.drop_layers(model, [0, 1, 2])
    with pytest.raises(TypeError, match="no BERT-style"):
        ps.prune_heads(torch.nn.Linear(2, 2), {0: [0]})
    assert model.encoder.layer[0].attention.self.query.out_features == 16  # nothing changed on refusal


# --------------------------------------------------------------------------- real models


def test_minilm_heads_pruned_equal_heads_zeroed(minilm):
    tokenizer, original = minilm
    model = copy.deepcopy(original)
    batch = tokenizer(["a quiet film about a loud family", "the plot twists twice"], padding=True,
                      return_tensors="pt")
    spec = {0: [0, 5], 3: [2, 7, 11]}
    handles = _zeroing(model, _bert_o, spec, width=32)
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    for handle in handles:
        handle.remove()
    before = sum(p.numel() for p in model.parameters())
    ps.prune_heads(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, expected)
    assert before - sum(p.numel() for p in model.parameters()) == 5 * (4 * 32 * 384 + 3 * 32)
    assert model.config.pruned_heads == spec


def test_smollm2_kv_groups_and_layers_pruned(smollm2):
    tokenizer, original = smollm2
    model = copy.deepcopy(original)
    ids = tokenizer("Pruning removes weights that matter least.", return_tensors="pt").input_ids
    spec = {i: [6, 7, 8] for i in range(30)}  # the third key/value group of every layer (head width 64)
    expected = _reference(model, _llama_o, spec, width=64, ids=ids)
    ps.prune_heads(model, spec)
    torch.testing.assert_close(_output(model, ids), expected)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 2)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (128, 576)
    layers, _ = ps.transformer_layers(model)
    handles = [layers[i].register_forward_hook(lambda module, args, output: args[0]) for i in (28, 29)]
    expected = _output(model, ids)
    for handle in handles:
        handle.remove()
    ps.drop_layers(model, [28, 29])
    torch.testing.assert_close(_output(model, ids), expected)
    assert model.config.num_hidden_layers == 28 and model.config.pruned_heads[27] == [6, 7, 8]


@pytest.mark.parametrize("make", [_tiny_bert, _tiny_llama])
def test_head_and_neuron_scores_are_the_norm_products_of_each_units_slices(make):
    model = make()
    layers, arch = ps.transformer_layers(model)
    heads, neurons = ps.head_scores(model), ps.neuron_scores(model)
    for index, layer in enumerate(layers):
        if arch == "bert":
            v, o, width = layer.attention.self.value, layer.attention.output.dense, layer.attention.self.attention_head_size
            n_heads, group, ups, down = o.in_features // width, 1, [layer.intermediate.dense], layer.output.dense
        else:
            attn = layer.self_attn
            v, o, width = attn.v_proj, attn.o_proj, attn.head_dim
            n_heads = o.in_features // width
            group = n_heads // (v.out_features // width)
            ups, down = [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj
        expected = []
        for h in range(n_heads):  # slice each head's rows and columns one by one
            g = h // group
            rows = torch.linalg.matrix_norm(v.weight[g * width:(g + 1) * width])
            cols = torch.linalg.matrix_norm(o.weight[:, h * width:(h + 1) * width])
            expected.append(rows * cols)
        torch.testing.assert_close(heads[index], torch.stack(expected).detach())
        expected = [torch.linalg.vector_norm(down.weight[:, i]) * torch.prod(torch.stack(
            [torch.linalg.vector_norm(up.weight[i]) for up in ups])) for i in range(down.in_features)]
        torch.testing.assert_close(neurons[index], torch.stack(expected).detach())


def test_lowest_keeps_the_top_units_per_layer_and_breaks_ties_by_index():
    scores = {0: torch.tensor([3.0, 1.0, 2.0, 1.0]), 2: torch.tensor([0.5, 0.5, 0.5, 0.5])}
    assert ps.lowest(scores, keep=2) == {0: [1, 3], 2: [2, 3]}
    assert ps.lowest(scores, keep=4) == {0: [], 2: []}
    model = _tiny_bert()
    plan = ps.lowest(ps.head_scores(model), keep=1)
    kept = [sorted(set(range(len(s))) - set(plan[i])) for i, s in ps.head_scores(model).items()]
    ps.prune_heads(model, plan)
    for index, score in ps.head_scores(model).items():  # the survivor is each layer's best head
        assert len(score) == 1 and kept[index] == [int(torch.argmax(ps.head_scores(_tiny_bert())[index]))]
    with pytest.raises(ValueError, match="keep=5 is more than layer 0's 4 units"):
        ps.lowest(scores, keep=5)
    with pytest.raises(ValueError, match="keep"):
        ps.lowest(scores, keep=0)
    with pytest.raises(TypeError, match="mapping"):
        ps.lowest([1.0], keep=1)
    with pytest.raises(TypeError, match="1-D tensor"):
        ps.lowest({0: [1.0, 2.0]}, keep=1)


@given(scores=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1, max_size=4),
       keep=st.integers(1, 12))
def test_lowest_removes_all_but_keep_and_never_keeps_a_lower_score_than_it_removes(scores, keep):
    tensors = {i: torch.tensor(s, dtype=torch.float32) for i, s in enumerate(scores)}
    if keep > min(len(s) for s in scores):
        with pytest.raises(ValueError, match="more than layer"):
            ps.lowest(tensors, keep)
        return
    plan = ps.lowest(tensors, keep)
    for layer, score in tensors.items():
        removed = set(plan[layer])
        kept = [i for i in range(len(score)) if i not in removed]
        assert len(kept) == keep and plan[layer] == sorted(removed)
        if removed:
            worst_kept = min((float(score[i]), -i) for i in kept)
            best_removed = max((float(score[i]), -i) for i in removed)
            assert worst_kept > best_removed  # higher score, or equal score and lower index
