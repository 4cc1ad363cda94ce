"""lightlm.exercises.check("head_scores", ...): accepts the head score written independently (numpy reshapes) and
names the usual slips, each with its own case."""

import numpy as np
import pytest
import torch

from lightlm import exercises


def numpy_head_scores(value, out, n_heads):
    v, o = value.numpy(), out.numpy()
    d = v.shape[0] // n_heads
    rows = np.sqrt((v.reshape(n_heads, d, -1) ** 2).sum(axis=(1, 2)))
    cols = np.sqrt((o.reshape(o.shape[0], n_heads, d) ** 2).sum(axis=(0, 2)))
    return torch.from_numpy(rows * cols)


def test_an_independent_head_score_passes():
    assert exercises.check("head_scores", numpy_head_scores) is None
    assert "head_scores" in exercises.names()


def _d(value, n):
    return value.shape[0] // n


@pytest.mark.parametrize("wrong, case", [
    # the output projection's ROWS instead of its columns
    (lambda v, o, n: torch.stack([v[h * _d(v, n):(h + 1) * _d(v, n)].norm() * o[h * _d(v, n):(h + 1) * _d(v, n)].norm()
                                  for h in range(n)]), "4 heads"),
    # heads interleaved: view(d, n, in) instead of view(n, d, in)
    (lambda v, o, n: v.view(_d(v, n), n, -1).norm(dim=(0, 2)) * o.view(o.shape[0], _d(v, n), n).norm(dim=(0, 1)),
     "4 heads"),
    # squared norms
    (lambda v, o, n: v.view(n, -1).pow(2).sum(1) * o.T.reshape(n, -1).pow(2).sum(1), "4 heads"),
    (lambda v, o, n: numpy_head_scores(v, o, n).tolist(), "expected a tensor"),
    (lambda v, o, n: (v.mul_(2), numpy_head_scores(v, o, n) / 2)[1], "modified its input"),
])
def test_the_usual_slips_are_named(wrong, case):
    with pytest.raises(AssertionError, match=case):
        exercises.check("head_scores", wrong)


def test_the_checker_agrees_with_the_library_on_a_real_bert_layer():
    """The same numbers as lightlm.prune_structured.head_scores on a BERT layer: two routes agree."""
    from transformers import BertConfig, BertModel

    from lightlm import prune_structured

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=20, hidden_size=24, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=8))
    layer = model.encoder.layer[0]
    got = numpy_head_scores(layer.attention.self.value.weight.detach(),
                            layer.attention.output.dense.weight.detach(), 4)
    torch.testing.assert_close(got, prune_structured.head_scores(model)[0])
