"""lightlm.plot and lightlm.widgets: figures hold the data they are given; the widget recomputes."""

import sys

import matplotlib

matplotlib.use("Agg")

import pytest

from lightlm import cost, plot, widgets


def test_memory_bars_draw_one_bar_per_size_and_dtype():
    table = cost.memory_table()
    ax = plot.memory_bars(table)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted(round(v, 6) for row in table.values() for v in row.values())
    assert ax.get_yscale() == "log"


def test_latency_curves_and_breakdown_hold_their_data():
    ax = plot.latency_curves([1, 2, 4], {"a": [1.0, 2.0, 4.0], "b": [1.0, 1.5, 2.0]}, "batch size")
    assert [list(line.get_ydata()) for line in ax.lines] == [[1.0, 2.0, 4.0], [1.0, 1.5, 2.0]]
    ax = plot.parameter_breakdown({"m": {"embeddings": 30, "layers": 70}})
    assert sorted(round(p.get_width()) for p in ax.patches) == [30, 70]


def test_plots_reject_inconsistent_data():
    with pytest.raises(ValueError, match="has 2 points"):
        plot.latency_curves([1, 2, 4], {"a": [1.0, 2.0]}, "batch size")
    with pytest.raises(ValueError):
        plot.memory_bars({})
    with pytest.raises(ValueError):
        plot.parameter_breakdown({})


def test_memory_explorer_recomputes_when_the_controls_move():
    box = widgets.memory_explorer(default_params=7e9, default_dtype="fp16")
    size, dtype, result = box.children
    assert "14.00 GB" in result.value
    dtype.value = "int4"
    assert "3.50 GB" in result.value
    size.value = 70e9
    assert "35.00 GB" in result.value and "H100" in result.value


def test_memory_explorer_falls_back_to_a_static_figure_without_ipywidgets(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # makes `import ipywidgets` raise ImportError
    figure = widgets.memory_explorer()
    assert isinstance(figure, matplotlib.figure.Figure)
    assert len(figure.axes[0].patches) == 3 * 5


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"default_dtype": "int3"}, ValueError, "default_dtype 'int3' must be one of"),
        ({"default_dtype": "nf4"}, ValueError, "default_dtype 'nf4' must be one of"),
        ({"default_dtype": 4}, TypeError, "default_dtype must be a dtype name, got int"),
        ({"default_params": 10}, ValueError, r"default_params must be in \[1000000.0, 1000000000000.0\], got 10"),
        ({"default_params": "7B"}, TypeError, "default_params must be a real number, got str"),
        ({"dtypes": "fp16"}, TypeError, "dtypes must be a tuple or list of dtype names"),
        ({"dtypes": ("fp16", "fp5"), "default_dtype": "fp16"}, ValueError, "unknown dtype 'fp5'"),
    ],
)
def test_memory_explorer_rejects_bad_defaults(kwargs, error, message):
    with pytest.raises(error, match=message):
        widgets.memory_explorer(**kwargs)


def test_table_formats_integers_floats_and_text():
    md = plot.table(["model", "params", "ms"], [("MiniLM", 22713216, 12.345)]).data
    assert md.splitlines() == ["| model | params | ms |", "|---|---|---|", "| MiniLM | 22,713,216 | 12.3 |"]
    with pytest.raises(ValueError, match="3 headers"):
        plot.table(["a", "b", "c"], [(1, 2)])


def test_attention_maps_draw_one_panel_per_map_and_check_shapes():
    import torch

    weights = torch.softmax(torch.randn(3, 5, 5), dim=-1)
    figure = plot.attention_maps(weights, list("abcde"), titles=["h0", "h1", "h2"], ncols=2)
    images = [ax.images[0].get_array() for ax in figure.axes if ax.images]
    assert len(images) == 3
    assert abs(float(images[1].sum()) - 5.0) < 1e-5  # each of the 5 rows sums to one
    with pytest.raises(ValueError, match="one token per key"):
        plot.attention_maps(weights, list("abc"))
    with pytest.raises(ValueError, match="maps, queries, keys"):
        plot.attention_maps(weights[0], list("abcde"))


def test_softened_distributions_hold_the_softmax_at_each_temperature():
    import torch

    logits = torch.tensor([2.0, 1.0, 0.0])
    ax = plot.softened_distributions(logits, ["a", "b", "c"], [1.0, 4.0])
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == pytest.approx(logits.softmax(-1).tolist())
    assert heights[3:] == pytest.approx((logits / 4).softmax(-1).tolist())
    with pytest.raises(ValueError, match=r"temperatures\[0\] must be > 0, got 0.0"):
        plot.softened_distributions(logits, ["a", "b", "c"], [0.0])
    with pytest.raises(TypeError, match=r"temperatures\[1\] must be a real number, got str"):
        plot.softened_distributions(logits, ["a", "b", "c"], [1.0, "2"])
    with pytest.raises(ValueError, match="temperatures is empty"):
        plot.softened_distributions(logits, ["a", "b", "c"], [])
    with pytest.raises(TypeError, match="temperatures must be a list or tuple of numbers, got float"):
        plot.softened_distributions(logits, ["a", "b", "c"], 2.0)


def test_temperature_explorer_softens_as_the_slider_moves():
    box = widgets.temperature_explorer([3.0, 1.0, 0.0], ["x", "y", "z"])
    slider, bars = box.children
    cold = float(bars.value.split("entropy ")[1].split()[0])
    slider.value = 10.0
    hot = float(bars.value.split("entropy ")[1].split()[0])
    assert hot > cold
    with pytest.raises(ValueError, match="one label per logit"):
        widgets.temperature_explorer([1.0, 2.0], ["x"])


def test_temperature_explorer_shows_labels_as_text_not_markup():
    import html

    labels = ["<b>", "&", "x"]
    box = widgets.temperature_explorer([3.0, 1.0, 0.0], labels)
    _, bars = box.children
    assert "<b>" not in bars.value  # the label is escaped, not a bold tag
    for label in labels:
        assert f">{html.escape(label)}</td>" in bars.value


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"default_temperature": "hot"}, TypeError, "default_temperature must be a real number, got str"),
        ({"default_temperature": 50.0}, ValueError, r"default_temperature must be in \[0.1, 20\], got 50.0"),
        ({"labels": "xyz"}, TypeError, "labels must be a list or tuple"),
    ],
)
def test_temperature_explorer_rejects_bad_input(kwargs, error, message):
    arguments = {"logits": [3.0, 1.0, 0.0], "labels": ["x", "y", "z"], **kwargs}
    with pytest.raises(error, match=message):
        widgets.temperature_explorer(**arguments)


def test_temperature_explorer_falls_back_to_a_static_figure(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    figure = widgets.temperature_explorer([3.0, 1.0, 0.0], ["x", "y", "z"])
    assert isinstance(figure, matplotlib.figure.Figure) and len(figure.axes[0].patches) == 9


def test_roofline_puts_each_kernel_on_min_of_peak_and_intensity_times_bandwidth():
    peak, bandwidth = 100e9, 10e9  # ridge at 10 FLOP/byte
    ax = plot.roofline(peak, bandwidth, {"decode": 0.5, "prefill": 40.0}, achieved={"decode": 2e9})
    roof, ridge, decode, decode_measured, prefill = ax.lines
    assert list(ridge.get_xdata()) == [10.0, 10.0]
    assert list(roof.get_xdata()) == [0.125, 10.0, 160.0]
    assert list(roof.get_ydata()) == pytest.approx([1.25, 100.0, 100.0])  # GFLOP/s
    assert decode.get_ydata()[0] == pytest.approx(5.0)  # 0.5 FLOP/byte × 10 GB/s: memory-bound
    assert decode_measured.get_ydata()[0] == pytest.approx(2.0)
    assert prefill.get_ydata()[0] == pytest.approx(100.0)  # above the ridge: the compute roof
    assert ax.get_xscale() == ax.get_yscale() == "log"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(peak_flops=0.0), ValueError, "peak_flops must be > 0"),
        (dict(bandwidth="fast"), TypeError, "bandwidth must be a real number"),
        (dict(intensities={}), ValueError, "intensities must be a non-empty dict"),
        (dict(intensities={"a": -1.0}), ValueError, r"intensities\['a'\] must be > 0"),
        (dict(achieved={"b": 1e9}), ValueError, "achieved has 'b', which is not among the intensities"),
    ],
)
def test_roofline_rejects_bad_input(kwargs, error, message):
    arguments = dict(peak_flops=1e11, bandwidth=1e10, intensities={"a": 1.0}) | kwargs
    with pytest.raises(error, match=message):
        plot.roofline(**arguments)


def test_source_shows_the_functions_code_dedented_and_highlighted():
    from lightlm.transformer import TransformerBlock

    shown = plot.source(plot.table, TransformerBlock.forward)
    assert type(shown).__name__ == "Code"
    assert shown.data.startswith("def table(headers")  # the module-level function as written
    assert "\ndef forward(self, x" in shown.data  # the method, dedented from its class body
    assert 'language="python"' in shown._repr_html_() or "highlight" in shown._repr_html_()


def test_source_refuses_what_has_no_source():
    with pytest.raises(ValueError, match="at least one"):
        plot.source()
    with pytest.raises(TypeError, match="functions, methods and classes"):
        plot.source("table")


def _weight():
    import torch

    return torch.randn(48, 96, generator=torch.Generator().manual_seed(0))


def test_quant_explorer_recomputes_and_matches_torchs_fake_quantize():
    """The error shown equals the one computed with torch's per-channel observer and fake-quantize kernel."""
    import torch
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    weight = _weight()
    box = widgets.quant_explorer(weight, default_bits=4, groups=("channel", 32, 128))
    bits, group, result = box.children
    assert [value for _, value in group.options] == ["channel", 32]  # 128 does not divide 96: left out
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, quant_min=0, quant_max=15)
    observer(weight)
    scale, zero = observer.calculate_qparams()
    decoded = torch.fake_quantize_per_channel_affine(weight, scale.float(), zero.int(), 0, 0, 15)
    error = float((weight - decoded).square().sum() / weight.square().sum())
    assert f"{error:.2e}" in result.value and f"{4 + 20 / 96:.3f} bits per weight" in result.value
    before = result.value
    bits.value = 8
    assert result.value != before and f"{8 + 24 / 96:.3f} bits" in result.value
    group.value = 32
    assert f"{8 + 24 / 32:.3f} bits" in result.value


def test_quant_explorer_falls_back_to_the_static_tradeoff(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    figure = widgets.quant_explorer(_weight(), groups=("channel", 32))
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2 and all(len(line.get_xdata()) == 7 for line in lines)  # 2..8 bits
    errors = lines[0].get_ydata()
    assert all(b < a for a, b in zip(errors, errors[1:]))  # one more bit, less error


@pytest.mark.parametrize("kwargs, error, message", [
    ({"weight": [[1.0, 2.0]]}, TypeError, "weight must be"),
    ({"default_bits": 1}, ValueError, r"default_bits must be in \[2, 8\]"),
    ({"groups": "channel"}, TypeError, "groups must be a non-empty tuple or list"),
    ({"groups": (100,)}, ValueError, "no group size in"),
    ({"groups": (0,)}, ValueError, "group size must be >= 1"),
])
def test_quant_explorer_rejects_bad_input(kwargs, error, message):
    kwargs = {"weight": _weight(), **kwargs}
    with pytest.raises(error, match=message):
        widgets.quant_explorer(**kwargs)


def test_quant_tradeoff_rejects_bad_curves():
    with pytest.raises(ValueError, match="non-empty dict"):
        plot.quant_tradeoff({})
    with pytest.raises(ValueError, match="pairs"):
        plot.quant_tradeoff({"per channel": [(4.0,)]})
    with pytest.raises(ValueError, match="error in curves"):
        plot.quant_tradeoff({"per channel": [(4.0, 0.0)]})
