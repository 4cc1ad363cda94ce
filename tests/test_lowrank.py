"""lightlm.lowrank against numpy's SVD and Eckart–Young, the closed-form optimum of the output error (through the
symmetric square root of XᵀX, not the Cholesky factor the library uses), lightlm.cost.count_parameters of the real
modules, real MiniLM layers with real activations and SmolLM2's weights; hypothesis properties of the energy rule.
Also ALBERT (chapter 9's parameter sharing): cost.param_count_from_config against AlbertModel on the meta device,
and torch's FLOP counter showing that sharing layers saves parameters but no FLOPs."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightlm import cost, lowrank

from conftest import seeded_linear, seeded_randn

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


_randn, _linear = seeded_randn, seeded_linear


def _product(factorized):
    """Ŵ = B A of a factorized Linear."""
    return factorized[1].weight.detach() @ factorized[0].weight.detach()


def _correlated(tokens, width, seed):
    """Inputs with strongly correlated features and very unequal scales, like real activations."""
    mixing = _randn(width, width, seed=100) * torch.logspace(0, -2, width, dtype=torch.float64)
    return _randn(tokens, width, seed=seed) @ mixing.T


# --------------------------------------------------------------------------- plain SVD


@pytest.mark.parametrize("d_in, d_out, bias", [(12, 7, True), (7, 12, True), (9, 9, False)])
def test_full_rank_factorization_reproduces_the_layer(d_in, d_out, bias):
    linear = _linear(d_in, d_out, bias=bias)
    factorized = lowrank.factorize_linear(linear, rank=min(d_in, d_out))
    assert [type(m) for m in factorized] == [nn.Linear, nn.Linear] and factorized[0].bias is None
    assert factorized[0].weight.shape == (min(d_in, d_out), d_in)
    assert factorized[1].weight.shape == (d_out, min(d_in, d_out))
    x = _randn(5, 3, d_in, seed=2)
    torch.testing.assert_close(factorized(x), linear(x))
    if bias:
        assert torch.equal(factorized[1].bias, linear.bias)


def test_truncation_error_is_the_norm_of_the_discarded_singular_values():
    """Eckart–Young: ‖W − W_r‖_F = √(Σ_{i>r} σ_i²), σ from numpy's SVD."""
    linear = _linear(10, 6, seed=3)
    sigma = np.linalg.svd(linear.weight.detach().numpy(), compute_uv=False)
    for rank in range(1, 7):
        error = torch.linalg.norm(linear.weight.detach() - _product(lowrank.factorize_linear(linear, rank=rank)))
        assert float(error) == pytest.approx(math.sqrt(float(np.sum(sigma[rank:] ** 2))), rel=1e-10, abs=1e-12)


def test_no_other_rank_r_factorization_tested_beats_the_truncated_svd():
    linear = _linear(10, 8, seed=4)
    weight = linear.weight.detach()
    gen = torch.Generator().manual_seed(5)
    for rank in (1, 3, 5):
        best = float(torch.linalg.norm(weight - _product(lowrank.factorize_linear(linear, rank=rank))))
        others = []
        for _ in range(50):
            a = torch.randn(rank, 10, generator=gen, dtype=torch.float64)            # random factors …
            b = torch.randn(8, rank, generator=gen, dtype=torch.float64)
            others.append(weight - b @ a)
            basis, _ = torch.linalg.qr(torch.randn(10, rank, generator=gen, dtype=torch.float64))
            others.append(weight - weight @ basis @ basis.T)                      # … the best in a random subspace
        columns = weight.norm(dim=0).argsort(descending=True)[:rank]
        others.append(weight - weight[:, columns] @ torch.linalg.pinv(weight[:, columns]) @ weight)  # CUR-like
        gram = lowrank.gram_matrix(_correlated(200, 10, seed=6))
        others.append(weight - _product(lowrank.factorize_linear(linear, rank=rank, gram=gram)))  # whitened
        assert min(float(torch.linalg.norm(e)) for e in others) > best


def test_the_factors_split_sigma_evenly():
    """A = Σ_r^½ V_rᵀ and B = U_r Σ_r^½, so A Aᵀ = BᵀB = Σ_r (σ from numpy)."""
    linear = _linear(9, 6, seed=7)
    sigma = torch.from_numpy(np.linalg.svd(linear.weight.detach().numpy(), compute_uv=False))
    a, b = (m.weight.detach() for m in lowrank.factorize_linear(linear, rank=4))
    torch.testing.assert_close(a @ a.T, torch.diag(sigma[:4]))
    torch.testing.assert_close(b.T @ b, torch.diag(sigma[:4]))


def _with_spectrum(values, d_in=7, seed=8):
    """A Linear whose weight has exactly the singular values ``values`` (float64)."""
    u, _ = torch.linalg.qr(_randn(len(values), len(values), seed=seed))
    v, _ = torch.linalg.qr(_randn(d_in, len(values), seed=seed + 1))
    linear = _linear(d_in, len(values))
    with torch.no_grad():
        linear.weight.copy_(u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T)
    return linear


@pytest.mark.parametrize("energy, rank", [(0.5, 1), (0.53, 1), (0.54, 2), (0.8, 2), (0.9, 3), (0.96, 3),
                                          (0.97, 4), (1.0, 4)])
def test_energy_picks_the_smallest_rank_that_keeps_the_fraction(energy, rank):
    """σ = 4, 3, 2, 1: σ² = 16, 9, 4, 1 of 30 — rank 1 keeps 16/30, rank 2 25/30, rank 3 29/30."""
    linear = _with_spectrum([4.0, 3.0, 2.0, 1.0])
    assert lowrank.rank_for_energy(torch.tensor([1.0, 4.0, 2.0, 3.0]), energy) == rank  # order does not matter
    assert lowrank.factorize_linear(linear, energy=energy)[0].out_features == rank
    torch.testing.assert_close(lowrank.energy_kept(torch.tensor([4.0, 3.0, 2.0, 1.0])),
                               torch.tensor([16, 25, 29, 30], dtype=torch.float64) / 30)


def test_energy_one_keeps_the_nonzero_singular_values_and_zero_weights_get_rank_one():
    assert lowrank.rank_for_energy(torch.tensor([3.0, 1.0, 0.0, 0.0]), 1.0) == 2
    assert lowrank.rank_for_energy(torch.zeros(5), 0.5) == 1
    torch.testing.assert_close(lowrank.energy_kept(torch.zeros(3)), torch.ones(3, dtype=torch.float64))


SINGULAR_VALUES = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40)


def _smallest_rank_by_loop(values, energy):
    """The definition, with a Python loop: the first r with Σ_{i≤r} σ_i² ≥ energy · Σσ² (σ sorted, float64)."""
    squares = [v * v for v in sorted((float(np.float64(np.float32(v))) for v in values), reverse=True)]
    running, sums = 0.0, []
    for square in squares:
        running += square
        sums.append(running)
    return next(r for r, kept in enumerate(sums, start=1) if kept >= energy * sums[-1])


@given(values=SINGULAR_VALUES, energy=st.floats(0.001, 1.0))
def test_property_the_chosen_rank_is_the_smallest_that_keeps_the_energy(values, energy):
    assert lowrank.rank_for_energy(torch.tensor(values), energy) == _smallest_rank_by_loop(values, energy)


@given(values=SINGULAR_VALUES, energies=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=6))
def test_property_rank_for_energy_is_monotone_and_energy_one_is_full_rank(values, energies):
    sigma = torch.tensor(values)
    ranks = [lowrank.rank_for_energy(sigma, e) for e in sorted(energies)]
    assert ranks == sorted(ranks)
    assert lowrank.rank_for_energy(sigma, 1.0) == len(values)  # all > 0


@given(seed=st.integers(0, 2**31), energy=st.floats(0.05, 1.0), shape=st.sampled_from([(6, 4), (3, 8), (5, 5)]))
def test_property_factorizing_by_energy_keeps_at_least_that_fraction_of_the_weight(seed, energy, shape):
    linear = _linear(shape[1], shape[0], seed=seed % 1000)
    factorized = lowrank.factorize_linear(linear, energy=energy)
    kept = float(torch.linalg.norm(_product(factorized)) ** 2 / torch.linalg.norm(linear.weight.detach()) ** 2)
    assert kept >= energy - 1e-12
    if factorized[0].out_features > 1:  # one rank less would not have been enough
        smaller = lowrank.factorize_linear(linear, rank=factorized[0].out_features - 1)
        assert float(torch.linalg.norm(_product(smaller)) ** 2 / torch.linalg.norm(linear.weight.detach()) ** 2) < energy


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("d_in, d_out, rank, bias", [(384, 384, 64, True), (384, 1536, 100, True),
                                                      (576, 1536, 32, False), (5, 3, 3, True)])
def test_counts_equal_count_parameters_of_the_real_modules(d_in, d_out, rank, bias):
    with torch.device("meta"):
        linear = nn.Linear(d_in, d_out, bias=bias)
        factorized = nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=bias))
    assert lowrank.lowrank_params(d_in, d_out, rank, bias) == (cost.count_parameters(linear),
                                                               cost.count_parameters(factorized))


@given(d_in=st.integers(1, 300), d_out=st.integers(1, 300), data=st.data())
def test_property_factorizing_saves_parameters_exactly_below_the_break_even_rank(d_in, d_out, data):
    rank = data.draw(st.integers(1, min(d_in, d_out)))
    dense, factorized = lowrank.lowrank_params(d_in, d_out, rank, bias=False)
    assert (factorized < dense) == (rank < lowrank.break_even_rank(d_in, d_out))


def test_break_even_rank_of_square_and_rectangular_weights():
    assert lowrank.break_even_rank(384, 384) == 192.0  # half the full rank
    assert lowrank.lowrank_params(384, 384, 192) == (384 * 384 + 384,) * 2
    assert lowrank.break_even_rank(384, 1536) == pytest.approx(307.2)  # 384·1536 / 1920


# --------------------------------------------------------------------------- dtypes and devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_weights_are_factorized_in_float32_and_returned_in_their_dtype(device, dtype):
    linear = _linear(16, 12, seed=9, dtype=dtype).to(device)
    wide = copy.deepcopy(linear).float()  # the same values in float32
    gram = lowrank.gram_matrix(_correlated(64, 16, seed=10).to(device=device, dtype=dtype))
    assert gram.dtype == torch.float32
    for kwargs in ({"rank": 5}, {"rank": 5, "gram": gram}):
        ours, reference = lowrank.factorize_linear(linear, **kwargs), lowrank.factorize_linear(wide, **kwargs)
        for mine, theirs in zip(ours.parameters(), reference.parameters()):
            assert mine.dtype == dtype and mine.device.type == device
            assert torch.equal(mine, theirs.to(dtype))


# --------------------------------------------------------------------------- activation-aware SVD


def _output_error(weight, approximation, x):
    return float(torch.linalg.norm(x @ (weight - approximation).T) / torch.linalg.norm(x @ weight.T))


def test_whitened_svd_is_the_closed_form_optimum_of_the_output_error():
    """min over rank-r Ŵ of ‖(W − Ŵ)Xᵀ‖_F is Ŵ = [W G^½]_r G^-½ (G = XᵀX, symmetric root by numpy's eigh), and its
    error is √(Σ_{i>r} σ_i(W G^½)²)."""
    linear, x = _linear(10, 6, seed=11), _correlated(200, 10, seed=12)
    weight, gram = linear.weight.detach(), (x.T @ x).numpy()
    values, vectors = np.linalg.eigh(gram)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    u, sigma, vt = np.linalg.svd(weight.numpy() @ root)
    for rank in (1, 3, 5):
        expected = (u[:, :rank] * sigma[:rank]) @ vt[:rank] @ inverse_root
        ours = _product(lowrank.factorize_linear(linear, rank=rank, gram=torch.from_numpy(gram)))
        torch.testing.assert_close(ours, torch.from_numpy(expected))
        assert float(torch.linalg.norm(x @ (weight - ours).T)) == pytest.approx(
            math.sqrt(float(np.sum(sigma[rank:] ** 2))), rel=1e-9)


def test_whitened_svd_beats_plain_svd_on_correlated_inputs_at_every_rank():
    linear = _linear(12, 8, seed=13)
    x, held_out = _correlated(300, 12, seed=14), _correlated(3000, 12, seed=15)
    weight, gram = linear.weight.detach(), lowrank.gram_matrix(x)
    for rank in range(1, 8):
        plain = _product(lowrank.factorize_linear(linear, rank=rank))
        whitened = _product(lowrank.factorize_linear(linear, rank=rank, gram=gram))
        assert _output_error(weight, whitened, x) < _output_error(weight, plain, x)
        assert _output_error(weight, whitened, held_out) < _output_error(weight, plain, held_out)


def test_whitened_svd_is_plain_svd_when_the_gram_matrix_is_a_multiple_of_identity():
    linear = _linear(9, 7, seed=16)
    for rank in (2, 6):
        plain = _product(lowrank.factorize_linear(linear, rank=rank))
        whitened = _product(lowrank.factorize_linear(linear, rank=rank, gram=3.7 * torch.eye(9, dtype=torch.float64)))
        torch.testing.assert_close(whitened, plain)


def test_the_scale_of_the_gram_matrix_does_not_matter():
    linear, x = _linear(9, 7, seed=17), _correlated(100, 9, seed=18)
    gram = lowrank.gram_matrix(x)
    torch.testing.assert_close(_product(lowrank.factorize_linear(linear, rank=3, gram=gram)),
                               _product(lowrank.factorize_linear(linear, rank=3, gram=2 * gram / 100)))


def test_a_singular_gram_matrix_is_dampened():
    """A dead input feature (a zero column of X): XᵀX has no Cholesky factor, so G + λI (λ = damp·mean diag G) is
    used instead — and the output error on X is still smaller than plain SVD's."""
    linear, x = _linear(10, 6, seed=19), _correlated(50, 10, seed=20)
    x[:, 3] = 0
    gram = lowrank.gram_matrix(x)
    dampened = gram + 0.01 * torch.diagonal(gram).mean() * torch.eye(10, dtype=torch.float64)
    ours = _product(lowrank.factorize_linear(linear, rank=3, gram=gram))
    torch.testing.assert_close(ours, _product(lowrank.factorize_linear(linear, rank=3, gram=dampened)))
    weight = linear.weight.detach()
    assert _output_error(weight, ours, x) < _output_error(weight, _product(lowrank.factorize_linear(linear, rank=3)), x)


def _minilm_inputs(tokenizer, model, sentences, module):
    """Inputs of one of MiniLM's Linears at the real (non-padding) tokens."""
    captured = []
    hook = module.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return captured[0][batch["attention_mask"].bool()]


def test_whitened_svd_beats_plain_svd_on_a_real_minilm_layer(minilm):
    from lightlm.data import movie_plot_sentences

    tokenizer, model = minilm
    sentences, linear = movie_plot_sentences(), model.encoder.layer[0].intermediate.dense
    x = _minilm_inputs(tokenizer, model, sentences[:48], linear)
    held_out = _minilm_inputs(tokenizer, model, sentences[48:72], linear)
    assert x.shape[0] > 2 * 384  # more tokens than inputs: XᵀX has full rank
    weight, gram = linear.weight.detach(), lowrank.gram_matrix(x)
    for rank in (32, 64, 128):
        plain = _product(lowrank.factorize_linear(linear, rank=rank))
        whitened = _product(lowrank.factorize_linear(linear, rank=rank, gram=gram))
        assert _output_error(weight, whitened, x) < _output_error(weight, plain, x)
        assert _output_error(weight, whitened, held_out) < _output_error(weight, plain, held_out)


# --------------------------------------------------------------------------- a model


def test_factorize_model_at_full_rank_leaves_minilm_unchanged_and_reports_the_counts(minilm):
    tokenizer, model = minilm
    model = copy.deepcopy(model).double()  # SVDs and forwards in float64: full rank reproduces to rounding
    batch = tokenizer(["a film about low-rank matrices", "two thin layers"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense"]
    total = cost.count_parameters(model)
    report = lowrank.factorize_model(model, names, rank=384)
    assert all(isinstance(model.get_submodule(name), nn.Sequential) for name in names)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, before)
    assert report["layers"]["encoder.layer.3.intermediate.dense"]["shape"] == (1536, 384)
    assert report["layers"]["encoder.layer.0.attention.self.query"]["rank"] == 384
    assert cost.count_parameters(model) - total == report["params_after"] - report["params_before"]
    assert report["params_before"] == (384 * 384 + 384) + (384 * 1536 + 1536)
    assert report["params_after"] == 384 * (384 + 384) + 384 + 384 * (384 + 1536) + 1536


def test_factorize_model_with_calibration_whitens_each_layer_with_its_sequential_inputs():
    """Layer 2 is whitened with the inputs it sees once layer 1 is factorized: the same as doing it by hand."""
    model = nn.Sequential(_linear(10, 8, seed=21), nn.Tanh(), _linear(8, 6, seed=22))
    reference = copy.deepcopy(model)
    batches = [_correlated(40, 10, seed=23), _correlated(30, 10, seed=24)]
    report = lowrank.factorize_model(model, ["0", "2"], rank=3, calibration=batches)
    x = torch.cat(batches)
    first = lowrank.factorize_linear(reference[0], rank=3, gram=x.T @ x)
    hidden = torch.tanh(first(x)).detach()
    second = lowrank.factorize_linear(reference[2], rank=3, gram=hidden.T @ hidden)
    for ours, theirs in ((model[0], first), (model[2], second)):  # Ŵ = BA (each singular vector's sign is free)
        torch.testing.assert_close(_product(ours), _product(theirs))
        torch.testing.assert_close(ours[1].bias, theirs[1].bias)
    unfactorized = torch.tanh(reference[0](x)).detach()  # what layer 2 would see without the sequential order
    parallel = lowrank.factorize_linear(reference[2], rank=3, gram=unfactorized.T @ unfactorized)
    assert not torch.allclose(_product(model[2]), _product(parallel))
    assert [report["layers"][n]["rank"] for n in ("0", "2")] == [3, 3]


def test_factorize_model_by_energy_reports_the_rank_and_energy_of_each_layer():
    model = nn.Sequential(_with_spectrum([4.0, 3.0, 2.0, 1.0]), nn.ReLU(), _with_spectrum([2.0, 1.0, 1.0, 1.0], 4))
    report = lowrank.factorize_model(model, ["0", "2"], energy=0.8)
    assert report["layers"]["0"]["rank"] == 2 and report["layers"]["0"]["energy"] == pytest.approx(25 / 30)
    assert report["layers"]["2"]["rank"] == 3 and report["layers"]["2"]["energy"] == pytest.approx(6 / 7)


def test_smollm2_mlp_factorization_by_energy_keeps_the_energy_and_saves_parameters(smollm2):
    _, model = smollm2
    layer = copy.deepcopy(model.model.layers[0])
    report = lowrank.factorize_model(layer, ["mlp.down_proj"], energy=0.9)
    entry = report["layers"]["mlp.down_proj"]
    sigma = np.linalg.svd(model.model.layers[0].mlp.down_proj.weight.detach().numpy().astype(np.float64),
                          compute_uv=False)
    kept = np.cumsum(sigma ** 2) / np.sum(sigma ** 2)
    assert entry["rank"] == int(np.sum(kept < 0.9)) + 1 and entry["energy"] >= 0.9
    assert entry["params_after"] < entry["params_before"]
    assert entry["params_after"] == cost.count_parameters(layer.mlp.down_proj)


# --------------------------------------------------------------------------- ALBERT: factorized embedding, sharing

ALBERT_BASE_V2 = 11_683_584  # AlbertModel("albert/albert-base-v2"): V = 30,000, E = 128, H = 768, one shared layer


@pytest.mark.parametrize("fields", [
    {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},   # albert-base-v2
    {},                                                                           # AlbertConfig(): xxlarge
    {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512, "embedding_size": 64,
     "num_hidden_layers": 6, "num_hidden_groups": 3, "inner_group_num": 2},
    {"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256, "embedding_size": 128,
     "num_hidden_layers": 4, "num_hidden_groups": 4, "vocab_size": 1000, "type_vocab_size": 3},
])
def test_albert_count_from_config_matches_albert_model_on_the_meta_device(fields):
    import transformers as tf

    config = tf.AlbertConfig(**fields)
    with torch.device("meta"):
        expected = cost.count_parameters(tf.AlbertModel(config))
    assert cost.param_count_from_config(config) == expected
    assert cost.param_count_from_config(config.to_dict()) == expected
    if fields.get("hidden_size") == 768:
        assert expected == ALBERT_BASE_V2


def test_albert_factorized_embedding_count_by_hand():
    """V·E + E·H (+ E×H bias) instead of V·H: the embedding of albert-base-v2 against a BERT-style one."""
    import transformers as tf

    albert = tf.AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
    bert_style = tf.AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, embedding_size=768)
    saved = cost.param_count_from_config(bert_style) - cost.param_count_from_config(albert)
    tables = 30000 + 512 + 2
    assert saved == tables * (768 - 128) + 2 * (768 - 128) + (768 * 768 - 128 * 768)


def test_sharing_layers_saves_memory_but_no_flops():
    import transformers as tf
    from torch.utils.flop_counter import FlopCounterMode

    fields = {"vocab_size": 100, "embedding_size": 16, "hidden_size": 64, "num_attention_heads": 4,
              "intermediate_size": 128, "num_hidden_layers": 4}
    batch, seq = 2, 10
    input_ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    flops, params = {}, {}
    for groups in (1, 4):  # one layer run four times, or four layers run once each
        torch.manual_seed(0)
        model = tf.AlbertModel(tf.AlbertConfig(**fields, num_hidden_groups=groups)).eval()
        model.set_attn_implementation("eager")  # the CPU SDPA kernel has no FLOP formula registered in torch
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=input_ids)
        flops[groups], params[groups] = counter.get_total_flops(), cost.count_parameters(model)
        if groups == 4:  # FLOPs: every executed weight once per token (cost.flops_per_token), pooler once
            per_token = cost.flops_per_token(cost.matmul_params(model.encoder), 4, seq, 64)
            assert flops[groups] == batch * seq * per_token + batch * 2 * cost.matmul_params(model.pooler)
    layer = 4 * (64 * 64 + 64) + 2 * 64 + 2 * 64 * 128 + 128 + 64 + 2 * 64
    assert params[4] - params[1] == 3 * layer
    assert flops[1] == flops[4]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, error, message", [
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=0), ValueError, "rank must be >= 1, got 0"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=4), ValueError, r"rank must be <= min\(d_in, d_out\) = 3"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=2.0), TypeError, "rank must be an int, got float"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), energy=0.0), ValueError, r"energy must be in \(0, 1\]"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), energy=1.01), ValueError, r"energy must be in \(0, 1\]"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), energy=float("nan")), ValueError, "energy must be a number"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), energy="all"), TypeError, "energy must be a real number"),
    (lambda: lowrank.factorize_linear(_linear(5, 3)), ValueError, "either rank or energy"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=2, energy=0.9), ValueError, "either rank or energy"),
    (lambda: lowrank.factorize_linear(nn.Conv1d(3, 3, 1), rank=1), TypeError,
     "linear must be an nn.Linear, got Conv1d"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=2, gram=torch.eye(3)), ValueError,
     r"gram must be \(in, in\)"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=2, gram=-torch.eye(5)), ValueError, "positive diagonal"),
    (lambda: lowrank.factorize_linear(_linear(2, 2), rank=1, gram=torch.tensor([[1.0, 3.0], [3.0, 1.0]])),
     ValueError, "not positive definite"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=2, gram=torch.eye(5), damp=0), ValueError,
     "damp must be > 0"),
    (lambda: lowrank.factorize_linear(_linear(5, 3), rank=2, gram=[[1.0]]), TypeError, "gram must be a torch.Tensor"),
    (lambda: lowrank.rank_for_energy(torch.tensor([1.0, -1.0]), 0.5), ValueError, "finite and >= 0"),
    (lambda: lowrank.rank_for_energy(torch.tensor([]), 0.5), ValueError, "must not be empty"),
    (lambda: lowrank.rank_for_energy(torch.ones(2, 2), 0.5), ValueError, "singular_values must be 1-D"),
    (lambda: lowrank.rank_for_energy(torch.tensor([3, 2]), 0.5), TypeError, "floating-point tensor"),
    (lambda: lowrank.rank_for_energy(torch.tensor([3.0, 2.0]), 0), ValueError, r"energy must be in \(0, 1\]"),
    (lambda: lowrank.lowrank_params(5, 3, 4), ValueError, r"rank must be <= min\(d_in, d_out\) = 3"),
    (lambda: lowrank.lowrank_params(0, 3, 1), ValueError, "d_in must be >= 1, got 0"),
    (lambda: lowrank.lowrank_params(5, 3, 1, bias=1), TypeError, "bias must be True or False"),
    (lambda: lowrank.break_even_rank(5, 0), ValueError, "d_out must be >= 1, got 0"),
    (lambda: lowrank.gram_matrix(torch.ones(3, 4, dtype=torch.int64)), TypeError, "inputs must be a floating-point"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3)), ["1"], rank=1), ValueError,
     r"unknown module name '1'; the model's nn.Linear modules are: \['0'\]"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3), nn.ReLU()), ["1"], rank=1), ValueError,
     r"module '1' is a ReLU, not an nn.Linear; the model's nn.Linear modules are: \['0'\]"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3)), [], rank=1), ValueError, "at least one"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3)), ["0", "0"], rank=1), ValueError, "named twice"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3)), [0], rank=1), TypeError, "module names"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3)), 0, rank=1), TypeError, "a module name or a list"),
    (lambda: lowrank.factorize_model(nn.Sequential(*[_linear(2, 2) for _ in range(14)]), ["x"], rank=1), ValueError,
     r"\[.0., .1., .*, .11.\] … \(14 in all\)"),
    (lambda: lowrank.factorize_model("model", ["0"], rank=1), TypeError, "model must be a torch.nn.Module"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3)), ["0"]), ValueError, "either rank or energy"),
    (lambda: lowrank.factorize_model(nn.Sequential(_linear(5, 3)), ["0"], rank=1, calibration=5), TypeError,
     "calibration must be a non-empty list"),
])
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_factorize_model_checks_every_layer_before_replacing_any():
    model = nn.Sequential(_linear(8, 8, seed=25), nn.ReLU(), _linear(8, 3, seed=26))
    with pytest.raises(ValueError, match=r"rank must be <= min\(d_in, d_out\) = 3"):
        lowrank.factorize_model(model, ["0", "2"], rank=5)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
