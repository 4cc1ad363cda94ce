"""lightlm.quant: affine quantization against torch's observers and fake-quantize ops, with hypothesis properties
(round-trip error within half a step, packing round-trips bit-exactly)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from lightlm import quant

CASES = [  # (dtype, qscheme, reduce_range)
    (torch.qint8, "affine", False), (torch.quint8, "affine", False), (torch.quint8, "affine", True),
    (torch.qint8, "symmetric", False), (torch.qint8, "symmetric", True), (torch.quint8, "symmetric", False)]
SCHEMES = {"affine": (torch.per_tensor_affine, torch.per_channel_affine),
           "symmetric": (torch.per_tensor_symmetric, torch.per_channel_symmetric)}


def _data(shift: float) -> torch.Tensor:
    return torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3 + shift


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max")  # torch deprecates reduce_range
@pytest.mark.parametrize("dtype, scheme, reduce_range", CASES)
@pytest.mark.parametrize("shift", [0.0, 5.0, -5.0])  # mixed signs, all positive, all negative
def test_qparams_are_min_max_observers(dtype, scheme, reduce_range, shift):
    x = _data(shift)
    observer = MinMaxObserver(dtype=dtype, qscheme=SCHEMES[scheme][0], reduce_range=reduce_range)
    observer(x)
    scale, zero_point = quant.qparams(x.min(), x.max(), observer.quant_min, observer.quant_max,
                                      symmetric=scheme == "symmetric")
    theirs = observer.calculate_qparams()
    torch.testing.assert_close(scale, theirs[0].reshape(()), rtol=0, atol=0)
    assert zero_point.item() == theirs[1].item()
    per_channel = PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=SCHEMES[scheme][1],
                                           reduce_range=reduce_range)
    per_channel(x)
    xmin, xmax = quant.observe(x, axis=0)
    scale, zero_point = quant.qparams(xmin, xmax, per_channel.quant_min, per_channel.quant_max,
                                      symmetric=scheme == "symmetric")
    theirs = per_channel.calculate_qparams()
    torch.testing.assert_close(scale, theirs[0], rtol=0, atol=0)
    assert torch.equal(zero_point, theirs[1].to(torch.int64))


def test_symmetric_unsigned_zero_points_are_torchs():
    # the default uint8 range gives 128; a range given explicitly gives the floor of its midpoint
    for quant_range, expected in (({}, 128), ({"quant_min": 0, "quant_max": 15}, 7)):
        observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, **quant_range)
        observer(_data(0.0))
        assert observer.calculate_qparams()[1].item() == expected
        ours = quant.qparams(torch.tensor(-1.0), torch.tensor(1.0), observer.quant_min, observer.quant_max,
                             symmetric=True)
        assert ours[1].item() == expected


@pytest.mark.parametrize("qmin, qmax", [(-128, 127), (0, 255), (-8, 7), (0, 15)])
def test_fake_quantize_per_tensor_is_torchs_in_values_and_gradient(qmin, qmax):
    x = _data(0.5).requires_grad_()
    scale, zero_point = quant.qparams(x.min().detach() * 0.8, x.max().detach() * 0.8, qmin, qmax)  # some clamp
    ours = quant.fake_quantize(x, scale, zero_point, qmin, qmax)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point), qmin, qmax)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), x)
    (theirs_grad,) = torch.autograd.grad((theirs * weights).sum(), x)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=0)
    assert (ours_grad == 0).any() and (ours_grad != 0).any()  # the clamp is exercised


@pytest.mark.parametrize("axis", [0, 1])
def test_fake_quantize_per_channel_is_torchs(axis):
    x = _data(1.0)
    xmin, xmax = quant.observe(x, axis=axis)
    scale, zero_point = quant.qparams(xmin, xmax, -128, 127)
    ours = quant.fake_quantize(x, scale, zero_point, -128, 127, axis=axis)
    theirs = torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), axis, -128, 127)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_per_group_is_per_channel_on_the_regrouped_tensor():
    x = _data(0.0)  # (6, 40), groups of 8 along the last dimension
    xmin, xmax = quant.observe(x, group_size=8)
    assert xmin.shape == (30,)
    scale, zero_point = quant.qparams(xmin, xmax, -8, 7)
    grouped = quant.fake_quantize(x, scale, zero_point, -8, 7, group_size=8)
    rows = x.reshape(30, 8)
    reference = torch.fake_quantize_per_channel_affine(rows, scale, zero_point.to(torch.int32), 0, -8, 7)
    torch.testing.assert_close(grouped, reference.reshape(6, 40), rtol=0, atol=0)


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64),
       st.integers(1, 8), st.booleans(), st.booleans())
def test_round_trip_error_is_at_most_half_a_step(values, bits, signed, symmetric):
    x = torch.tensor(values, dtype=torch.float32)
    qmin, qmax = quant.int_range(bits, signed)
    scale, zero_point = quant.qparams(x.min(), x.max(), qmin, qmax, symmetric=symmetric)
    q = quant.quantize(x, scale, zero_point, qmin, qmax)
    assert qmin <= q.min() and q.max() <= qmax
    low, high = scale * (qmin - zero_point), scale * (qmax - zero_point)
    inside = (x >= low) & (x <= high)
    error = (quant.dequantize(q, scale, zero_point) - x).abs()
    assert (error[inside] <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()[inside]).all()
    if not symmetric:  # affine: every observed value within half a step (rounding z shifts the grid by < s/2)
        assert (error <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all()  # and 0 is exact
        zero = quant.quantize(torch.zeros(1), scale, zero_point, qmin, qmax)
        assert quant.dequantize(zero, scale, zero_point).item() == 0.0


@given(st.lists(st.integers(-8, 7), min_size=1, max_size=32), st.booleans())
def test_int4_packing_round_trips_bit_exactly(values, signed):
    values = values + values[:1] if len(values) % 2 else values  # an even count
    q = torch.tensor(values) if signed else torch.tensor(values) + 8
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == q.numel() // 2
    assert torch.equal(quant.unpack_int4(packed, signed=signed).to(torch.int64), q)


def test_int4_packing_puts_the_first_value_in_the_low_nibble():
    assert quant.pack_int4(torch.tensor([1, 2, -1, 7])).tolist() == [0x21, 0x7F]


def test_int_range():
    assert quant.int_range(8) == (-128, 127) and quant.int_range(8, signed=False) == (0, 255)
    assert quant.int_range(4) == (-8, 7) and quant.int_range(1, signed=False) == (0, 1)


@pytest.mark.parametrize("call, error, match", [
    (lambda: quant.int_range(0), ValueError, "bits"),
    (lambda: quant.int_range(9), ValueError, "bits"),
    (lambda: quant.qparams(torch.tensor(0.0), torch.tensor(1.0), 5, 5), ValueError, "qmin must be below"),
    (lambda: quant.qparams(torch.tensor(2.0), torch.tensor(1.0), 0, 15), ValueError, "xmin must not exceed"),
    (lambda: quant.qparams(torch.tensor(float("nan")), torch.tensor(1.0), 0, 15), ValueError, "finite"),
    (lambda: quant.observe(torch.ones(4, 6), group_size=4), ValueError, "must divide"),
    (lambda: quant.observe(torch.ones(4, 8), axis=0, group_size=4), ValueError, "not both"),
    (lambda: quant.observe(torch.tensor([1.0, float("inf")])), ValueError, "finite"),
    (lambda: quant.observe(torch.ones(4, dtype=torch.int64)), TypeError, "floating"),
    (lambda: quant.pack_int4(torch.tensor([1, 2, 3])), ValueError, "even"),
    (lambda: quant.pack_int4(torch.tensor([1.0, 2.0])), TypeError, "integer"),
    (lambda: quant.pack_int4(torch.tensor([1, 16])), ValueError, "4 bits"),
    (lambda: quant.unpack_int4(torch.tensor([1, 2])), TypeError, "uint8"),
])
def test_bad_inputs_are_refused_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()
