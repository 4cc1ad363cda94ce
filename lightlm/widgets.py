"""Interactive demos. Each falls back to a static figure where ipywidgets is missing; in the built HTML the
widget shows in its initial state (the kernel that would recompute it is gone), so chapters show the static
figure beside it."""

from __future__ import annotations

import html
from typing import Any, Sequence

from . import cost
from ._checks import check_real

__all__ = ["memory_explorer", "temperature_explorer", "quant_explorer"]


def memory_explorer(default_params: float = 7e9, default_dtype: str = "fp16",
                    dtypes: Sequence[str] = ("fp32", "fp16", "bf16", "int8", "int4")) -> Any:
    """A slider (parameters, log scale) and a dropdown (dtype) -> GB of weights and which devices hold them.

    Args:
        default_params: the slider's starting number of parameters, in [1e6, 1e12].
        default_dtype: the starting dtype, one of ``dtypes``.
        dtypes: dtype names (see :func:`lightlm.cost.bytes_per_param`).

    Returns:
        an ``ipywidgets.VBox``; or, without ipywidgets, a static matplotlib figure of the same grid.
    """
    if not isinstance(dtypes, (tuple, list)) or not all(isinstance(d, str) for d in dtypes):
        raise TypeError(f"dtypes must be a tuple or list of dtype names, got {dtypes!r}")
    for dtype in dtypes:
        cost.bytes_per_param(dtype)  # validates each name
    if not isinstance(default_dtype, str):
        raise TypeError(f"default_dtype must be a dtype name, got {type(default_dtype).__name__}")
    if default_dtype not in dtypes:
        raise ValueError(f"default_dtype {default_dtype!r} must be one of {tuple(dtypes)}")
    check_real("default_params", default_params, min=1e6, max=1e12)
    try:
        import ipywidgets as w
    except ImportError:
        from . import plot

        sizes = {"1B": 1e9, "7B": 7e9, "70B": 70e9}
        return plot.memory_bars(cost.memory_table(sizes, tuple(dtypes))).figure

    size = w.FloatLogSlider(value=default_params, base=10, min=6, max=12, step=0.05, description="parameters",
                            readout_format=".2e", continuous_update=True)
    dtype = w.ToggleButtons(options=list(dtypes), value=default_dtype, description="dtype")
    result = w.HTML()

    def update(_=None) -> None:
        gb = cost.weight_memory(size.value, dtype.value) / 1e9
        fits = [name for name, cap in _DEVICES.items() if gb <= cap]
        result.value = (
            f"<b>{size.value / 1e9:.2f}B parameters × {cost.bytes_per_param(dtype.value):g} bytes = {gb:,.2f} GB</b>"
            f" of weights &nbsp;·&nbsp; fits in: {', '.join(fits) if fits else 'no single device listed'}"
        )

    size.observe(update, names="value")
    dtype.observe(update, names="value")
    update()
    return w.VBox([size, dtype, result])


_DEVICES = {"phone (8 GB)": 8, "laptop (16 GB)": 16, "RTX 4090 (24 GB)": 24, "H100 (80 GB)": 80}


def temperature_explorer(logits: Any, labels: Sequence[str], default_temperature: float = 1.0) -> Any:
    """A temperature slider over softmax(logits / T): the bars soften as T grows (chapter 6, eq. (softmax-t)).

    Args:
        logits: 1-D, a tensor or a list of numbers; labels: one text per logit (shown as text, never as HTML);
        default_temperature: the slider's start, in [0.1, 20].

    Returns an ``ipywidgets.VBox`` (slider + bar chart rendered as HTML); without ipywidgets, a static
    matplotlib figure at T = 1, 2, 5.
    """
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float64)
    if not isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be a list or tuple of texts, got {type(labels).__name__}")
    if logits.ndim != 1 or len(labels) != len(logits):
        raise ValueError(f"need one label per logit: {tuple(logits.shape)} logits, {len(labels)} labels")
    check_real("default_temperature", default_temperature, min=0.1, max=20)
    try:
        import ipywidgets as w
    except ImportError:
        from . import plot

        return plot.softened_distributions(logits, labels, (1.0, 2.0, 5.0)).figure

    slider = w.FloatLogSlider(value=default_temperature, base=10, min=-1, max=1.3, step=0.02,
                              description="T", readout_format=".2f")
    bars = w.HTML()

    def update(_=None) -> None:
        probabilities = (logits / slider.value).softmax(-1).tolist()
        entropy = -sum(p * torch.tensor(p).log().item() for p in probabilities if p > 0)
        rows = "".join(
            f"<tr><td style='padding-right:8px'>{html.escape(str(label))}</td>"
            f"<td><div style='background:#4c78a8;height:12px;"
            f"width:{300 * p:.1f}px'></div></td><td style='padding-left:6px'>{p:.3f}</td></tr>"
            for label, p in zip(labels, probabilities)
        )
        bars.value = f"<table>{rows}</table><div>entropy {entropy:.3f} nats</div>"

    slider.observe(update, names="value")
    update()
    return w.VBox([slider, bars])


def _quant_point(weight: Any, bits: int, group: Any) -> tuple[float, float]:
    """(bits per weight, relative error) of unsigned affine codes per row ("channel") or per group of a row."""
    import torch

    from . import quant

    qmin, qmax = quant.int_range(bits, signed=False)
    where = {"axis": 0} if group == "channel" else {"group_size": group}
    scale, zero = quant.qparams(*quant.observe(weight, **where), qmin, qmax)
    decoded = quant.fake_quantize(weight, scale, zero, qmin, qmax, **where)
    error = float((weight - decoded).square().sum() / weight.square().sum())
    per = weight.shape[1] if group == "channel" else group
    return bits + (16 + bits) / per, error if error > 0 else float(torch.finfo(torch.float32).tiny)


def quant_explorer(weight: Any, default_bits: int = 4, groups: Sequence[Any] = ("channel", 128, 64, 32)) -> Any:
    """Two controls, bits (2–8) and granularity, -> the relative error ‖W − Ŵ‖²/‖W‖² of a weight matrix quantized
    with unsigned affine codes and the bits per weight it takes with fp16 scales and b-bit zero points (chapter 10).

    Args:
        weight: a 2-D float tensor (out, in). groups: ``"channel"`` (one scale per row) and group sizes; those
            that do not divide the row width are left out (never silently cut). default_bits: in [2, 8].

    Returns an ``ipywidgets.VBox``; without ipywidgets, the static figure of every setting
    (:func:`lightlm.plot.quant_tradeoff`).
    """
    from ._checks import check_int, check_tensor

    weight = check_tensor("weight", weight, kind="float", ndim=2)
    default_bits = check_int("default_bits", default_bits, min=2, max=8)
    if not isinstance(groups, (tuple, list)) or not groups:
        raise TypeError(f"groups must be a non-empty tuple or list of 'channel' and group sizes, got {groups!r}")
    usable = []
    for group in groups:
        if group != "channel":
            check_int("group size", group, min=1)
        if group == "channel" or weight.shape[1] % group == 0:
            usable.append(group)
    if not usable:
        raise ValueError(f"no group size in {tuple(groups)} divides the row width {weight.shape[1]}")
    try:
        import ipywidgets as w
    except ImportError:
        from . import plot

        curves = {str(g): [_quant_point(weight, b, g) for b in range(2, 9)] for g in usable}
        return plot.quant_tradeoff(curves).figure

    bits = w.IntSlider(value=default_bits, min=2, max=8, description="bits")
    group = w.ToggleButtons(options=[("per channel" if g == "channel" else f"groups of {g}", g) for g in usable],
                            value=usable[0], description="scales")
    result = w.HTML()

    def update(_=None) -> None:
        per_weight, error = _quant_point(weight, bits.value, group.value)
        result.value = (f"<b>{per_weight:.3f} bits per weight</b> ({per_weight / 32:.1%} of fp32) &nbsp;·&nbsp; "
                        f"relative error ‖W − Ŵ‖²/‖W‖² = {error:.2e}")

    bits.observe(update, names="value")
    group.observe(update, names="value")
    update()
    return w.VBox([bits, group, result])
