"""lightlm.artefacts.capstone: chapter 13's pipeline. The student keeps exactly the teacher's chosen layers, its
cached weights round-trip, the int8 base stores every Linear but the classifier as torch's per-channel int8,
distillation lowers the KD loss and never touches the frozen embeddings, and the cached stages agree with what
they say (plan, accuracies) when rebuilt from the teacher."""

import copy

import pytest
import torch
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from lightlm import artefacts, prune_structured
from lightlm.artefacts import capstone
from lightlm.quant_linear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _six_layer_bert():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


def test_the_student_is_the_teachers_kept_layers_with_frozen_embeddings():
    teacher = _six_layer_bert()
    student = capstone.build_student(teacher)
    kept = capstone.SETTINGS["keep_layers"]
    assert student.config.num_hidden_layers == len(kept) == len(student.bert.encoder.layer)
    for new, old in enumerate(kept):
        for (name, a), (_, b) in zip(student.bert.encoder.layer[new].state_dict().items(),
                                     teacher.bert.encoder.layer[old].state_dict().items()):
            assert torch.equal(a, b), name
    assert not student.get_input_embeddings().weight.requires_grad
    assert all(p.requires_grad for n, p in student.named_parameters() if "word_embeddings" not in n)


def test_cached_weights_round_trip_without_the_embedding_and_wrong_ones_are_refused(monkeypatch):
    monkeypatch.setitem(capstone.SETTINGS, "heads", 2)
    monkeypatch.setitem(capstone.SETTINGS, "neurons", 16)
    teacher = _six_layer_bert()
    student = capstone.build_student(teacher)
    plan = {"heads": prune_structured.lowest(prune_structured.head_scores(student), 2),
            "neurons": prune_structured.lowest(prune_structured.neuron_scores(student), 16)}
    prune_structured.prune_heads(student, plan["heads"])
    prune_structured.prune_neurons(student, plan["neurons"])
    with torch.no_grad():
        student.classifier.weight.add_(1.0)  # something training would have changed
    weights = capstone._weights(student)
    assert capstone._EMBEDDING not in weights
    rebuilt = capstone.build_student(teacher, weights, {k: {str(i): v for i, v in p.items()} for k, p in plan.items()})
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rebuilt(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        capstone.build_student(teacher, weights)  # the pruned weights on the unpruned architecture
    with pytest.raises(ValueError, match="do not fit"):
        capstone.build_student(teacher, {**weights, "extra.weight": torch.zeros(1)}, plan)


def test_the_int8_base_is_torchs_per_channel_int8_frozen_with_a_float_classifier():
    student = capstone.build_student(_six_layer_bert())
    base = capstone.int8_base(student)
    quantized = {n: m for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    linears = {n: m for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(quantized) == set(linears) - {"classifier"}
    assert isinstance(base.classifier, torch.nn.Linear) and not any(p.requires_grad for p in base.parameters())
    for name, layer in quantized.items():
        weight = linears[name].weight.detach()
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        observer(weight)
        scale, zero = observer.calculate_qparams()
        expected = torch.fake_quantize_per_channel_affine(weight, scale.float(), zero.int(), 0, -128, 127)
        torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=0, atol=1e-7)
    assert all(p.requires_grad for p in student.parameters() if p is not student.get_input_embeddings().weight)


def test_distillation_lowers_the_kd_loss_and_leaves_the_embedding_alone(monkeypatch):
    monkeypatch.setitem(capstone.SETTINGS, "lr", 1e-3)
    monkeypatch.setitem(capstone.SETTINGS, "batch", 8)
    teacher = _six_layer_bert()
    generator = torch.Generator().manual_seed(2)
    ids = [torch.randint(1, 100, (int(n),), generator=generator) for n in torch.randint(3, 9, (32,), generator=generator)]
    with torch.no_grad():
        logits = torch.stack([teacher(input_ids=x[None]).logits[0] for x in ids]) * 5
    student = capstone.build_student(teacher)
    embedding = student.get_input_embeddings().weight.clone()
    losses, _ = capstone._distill(student, ids, logits, 40, seed=0, desc="test", progress=False)
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert torch.equal(student.get_input_embeddings().weight, embedding)


def test_registered_and_arguments_checked():
    assert artefacts.ARTEFACTS["capstone"][1] == (capstone.capstone_path().name,)
    order = list(artefacts.ARTEFACTS)
    assert order.index("capstone") > order.index("rt-teacher")  # it reads the teacher, built before it


@pytest.mark.slow
def test_the_cached_stages_are_what_they_say():
    from conftest import require_warm

    require_warm(capstone.capstone_path(), capstone.capstone_inputs())
    from lightlm.artefacts import teachers

    pipeline = capstone.load_capstone(progress=False)
    _, teacher = teachers.load_rt_teacher(progress=False)
    test = teachers.rt_teacher_outputs(progress=False)["test"]
    distilled = pipeline["student"]("distilled", 0, teacher)
    pruned = pipeline["student"]("pruned", 0, teacher)
    s = pipeline["settings"]
    layer = pruned.bert.encoder.layer[0]
    assert layer.attention.self.query.out_features == 32 * s["heads"]
    assert layer.intermediate.dense.out_features == s["neurons"]
    plan = prune_structured.lowest(prune_structured.head_scores(distilled), s["heads"])
    cut = copy.deepcopy(distilled)
    prune_structured.prune_heads(cut, plan)
    assert [h.lightlm_heads for h in (l.attention.self for l in cut.bert.encoder.layer)] == \
        [h.lightlm_heads for h in (l.attention.self for l in pruned.bert.encoder.layer)]
    run = pipeline["runs"]["0"]
    assert capstone.accuracy(pruned, test.input_ids, test.labels) == run["pruned"]["test"]
    assert run["cut"]["test"] < run["pruned"]["test"] and run["initial"]["test"] < run["distilled"]["test"]
    with pytest.raises(ValueError, match="stage"):
        pipeline["student"]("quantized", 0, teacher)
    with pytest.raises(ValueError, match="seed"):
        pipeline["student"]("pruned", 7, teacher)
