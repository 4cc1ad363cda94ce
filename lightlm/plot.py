"""Shared figures, so chapters show pictures without plotting boilerplate (matplotlib is imported lazily)."""

from __future__ import annotations

from typing import Any, Sequence

from ._checks import check_real

__all__ = ["DEVICE_MEMORY_GB", "memory_bars", "latency_curves", "parameter_breakdown", "table", "source", "attention_maps",
           "softened_distributions", "roofline"]

DEVICE_MEMORY_GB = {"laptop (16 GB)": 16, "RTX 4090 (24 GB)": 24, "H100 (80 GB)": 80}


def _axes(ax: Any = None, figsize: tuple[float, float] = (6.4, 3.6)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def memory_bars(table: dict[str, dict[str, float]], ax: Any = None, budgets: dict[str, float] | None = None):
    """Grouped bars of weight memory (GB) per model size and dtype, log scale, with device budgets as lines.

    Args:
        table: ``{size: {dtype: GB}}``, as :func:`lightlm.cost.memory_table` returns.
        budgets: ``{label: GB}`` horizontal reference lines (default: a laptop, a 24 GB and an 80 GB GPU).
    """
    if not table:
        raise ValueError("table is empty")
    ax = _axes(ax)
    sizes = list(table)
    dtypes = list(next(iter(table.values())))
    width = 0.8 / len(dtypes)
    for j, dtype in enumerate(dtypes):
        xs = [i + (j - (len(dtypes) - 1) / 2) * width for i in range(len(sizes))]
        bars = ax.bar(xs, [table[size][dtype] for size in sizes], width, label=dtype)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    for k, (label, gb) in enumerate((DEVICE_MEMORY_GB if budgets is None else budgets).items()):
        ax.axhline(gb, color="0.4", lw=0.8, ls=(0, (4, 2 + k)))
        ax.annotate(label, (-0.45, gb), fontsize=7, ha="left", va="bottom", color="0.3")
    ax.set_yscale("log")
    ax.set_xticks(range(len(sizes)), [f"{s} parameters" for s in sizes])
    ax.set_ylabel("weights only (GB)")
    ax.legend(title="dtype", fontsize=8, ncols=len(dtypes))
    return ax


def latency_curves(
    x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ax: Any = None,
    ylabel: str = "latency (ms)", logx: bool = True, title: str | None = None,
):
    """Lines of latency (or any cost) against one varying quantity, one line per model."""
    ax = _axes(ax)
    for label, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"series {label!r} has {len(ys)} points but x has {len(x)}")
        ax.plot(x, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def parameter_breakdown(breakdowns: dict[str, dict[str, int]], ax: Any = None):
    """Horizontal stacked bars: where each model's parameters sit (shares of the total, in %)."""
    if not breakdowns:
        raise ValueError("breakdowns is empty")
    ax = _axes(ax, figsize=(6.4, 0.6 + 0.6 * len(breakdowns)))
    parts = list(dict.fromkeys(part for parts in breakdowns.values() for part in parts))
    left = [0.0] * len(breakdowns)
    for part in parts:
        shares = [100 * b.get(part, 0) / sum(b.values()) for b in breakdowns.values()]
        bars = ax.barh(list(breakdowns), shares, left=left, label=part)
        ax.bar_label(bars, labels=[f"{s:.0f}%" if s >= 4 else "" for s in shares], label_type="center", fontsize=8)
        left = [l + s for l, s in zip(left, shares)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of parameters (%)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncols=min(4, len(parts)), loc="upper center",
              bbox_to_anchor=(0.5, -0.35 - 0.1 / len(breakdowns)))
    return ax


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ",.3g"):
    """A results table rendered as Markdown in notebooks and in the built book.

    Integers get thousands separators, floats ``floatfmt``; strings pass through. Returns an
    ``IPython.display.Markdown`` object (display it, or let it be a cell's last value).
    """
    from IPython.display import Markdown

    def fmt(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        return f"{value:,}" if isinstance(value, int) else format(value, floatfmt)

    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells but there are {len(headers)} headers")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def source(*functions: Any):
    """The library's source of each function, syntax-highlighted, as an ``IPython.display.Code`` object.

    The chapters show the library's code this way, so the text on the page is the code that runs.
    """
    import inspect
    import textwrap

    from IPython.display import Code

    if not functions:
        raise ValueError("source needs at least one function, method or class")
    for function in functions:
        if not (inspect.isfunction(function) or inspect.ismethod(function) or inspect.isclass(function)):
            raise TypeError(f"source shows functions, methods and classes, got {type(function).__name__}")
    return Code("\n".join(textwrap.dedent(inspect.getsource(f)) for f in functions), language="python")


def attention_maps(weights: Any, tokens: Sequence[str], titles: Sequence[str] | None = None, ncols: int = 4,
                   cell: float = 2.6):
    """Heatmaps of attention weights, one panel per map: ``weights`` is (maps, queries, keys).

    Rows are queries ("who is looking"), columns keys ("at what"); every row sums to 1.
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    weights = weights.detach().cpu().float().numpy() if hasattr(weights, "detach") else weights
    if len(weights.shape) != 3:
        raise ValueError(f"weights must be (maps, queries, keys), got shape {tuple(weights.shape)}")
    n_maps, n_queries, n_keys = weights.shape
    if len(tokens) != n_keys or n_queries != n_keys:
        raise ValueError(f"need square maps with one token per key: {n_queries}x{n_keys} maps, {len(tokens)} tokens")
    if titles is not None and len(titles) != n_maps:
        raise ValueError(f"{len(titles)} titles for {n_maps} maps")
    ncols = min(ncols, n_maps)
    nrows = -(-n_maps // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols + 0.6, cell * nrows + 0.6), squeeze=False,
                             layout="constrained")
    for index, ax in enumerate(axes.flat):
        if index >= n_maps:
            ax.axis("off")
            continue
        ax.imshow(weights[index], cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(n_keys), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(n_queries), tokens, fontsize=6)
        if titles is not None:
            ax.set_title(titles[index], fontsize=8)
    return fig


def softened_distributions(logits: Any, labels: Sequence[str], temperatures: Sequence[float], ax: Any = None):
    """Grouped bars of softmax(logits / T) for several temperatures T (chapter 6, eq. (softmax-t))."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float64)
    if logits.ndim != 1 or len(labels) != len(logits):
        raise ValueError(f"need one label per logit: {tuple(logits.shape)} logits, {len(labels)} labels")
    if not isinstance(temperatures, (list, tuple)):
        raise TypeError(f"temperatures must be a list or tuple of numbers, got {type(temperatures).__name__}")
    if not temperatures:
        raise ValueError("temperatures is empty: give at least one temperature")
    for index, temperature in enumerate(temperatures):
        check_real(f"temperatures[{index}]", temperature, min=0, min_open=True)  # positive and finite
    ax = _axes(ax, figsize=(max(6.4, 0.55 * len(labels)), 3.4))
    width = 0.8 / len(temperatures)
    for j, temperature in enumerate(temperatures):
        probabilities = (logits / temperature).softmax(-1)
        xs = [i + (j - (len(temperatures) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, probabilities.tolist(), width, label=f"T = {temperature:g}")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)
    return ax


def roofline(peak_flops: float, bandwidth: float, intensities: dict[str, float],
             achieved: dict[str, float] | None = None, ax: Any = None):
    """A roofline (Williams et al. 2009; chapter 1): attainable FLOP/s = min(peak, intensity × bandwidth).

    Log-log axes in FLOP/byte and GFLOP/s. Each entry of ``intensities`` (``{label: FLOP per byte}``) is
    marked on the roof, the best it can reach; ``achieved`` (``{label: measured FLOP/s}``, labels among
    those of ``intensities``) adds hollow markers where the measurement actually landed. The ridge point,
    peak / bandwidth, divides memory-bound (left) from compute-bound (right).

    Args:
        peak_flops: compute roof in FLOP/s (e.g. :func:`lightlm.bench.peak_matmul_flops`).
        bandwidth: memory roof in bytes/s (e.g. :func:`lightlm.bench.memory_bandwidth`).
    """
    peak = check_real("peak_flops", peak_flops, min=0, min_open=True)
    bandwidth = check_real("bandwidth", bandwidth, min=0, min_open=True)
    if not isinstance(intensities, dict) or not intensities:
        raise ValueError("intensities must be a non-empty dict {label: FLOP per byte}")
    for label, value in intensities.items():
        check_real(f"intensities[{label!r}]", value, min=0, min_open=True)
    achieved = {} if achieved is None else achieved
    for label, value in achieved.items():
        if label not in intensities:
            raise ValueError(f"achieved has {label!r}, which is not among the intensities {list(intensities)}")
        check_real(f"achieved[{label!r}]", value, min=0, min_open=True)
    ax = _axes(ax)
    ridge = peak / bandwidth
    low = min(min(intensities.values()), ridge) / 4
    high = max(max(intensities.values()), ridge) * 4
    xs = [low, ridge, high]
    ax.plot(xs, [min(peak, x * bandwidth) / 1e9 for x in xs], color="k", lw=1.5, label="roof")
    ax.axvline(ridge, color="0.5", lw=0.8, ls=":")
    ax.annotate(f"ridge {ridge:.3g} FLOP/byte", (ridge, peak / 1e9), fontsize=7, ha="left", va="bottom",
                xytext=(3, 3), textcoords="offset points")
    for index, (label, intensity) in enumerate(intensities.items()):
        color = f"C{index}"
        ax.plot([intensity], [min(peak, intensity * bandwidth) / 1e9], "o", color=color, label=label)
        if label in achieved:
            ax.plot([intensity], [achieved[label] / 1e9], "o", mfc="none", color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("GFLOP/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return ax


def quant_tradeoff(curves: dict[str, Sequence[tuple[float, float]]], ax: Any = None):
    """Quantization error against storage (chapter 10): one line per granularity, each point a bit width.

    ``curves``: ``{label: [(bits per weight, relative error ‖W − Ŵ‖²/‖W‖²), ...]}``; log error axis.
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must be a non-empty dict {label: [(bits per weight, error), ...]}")
    ax = _axes(ax)
    for label, points in curves.items():
        if not points or any(len(point) != 2 for point in points):
            raise ValueError(f"curves[{label!r}] must be a non-empty list of (bits per weight, error) pairs")
        for bits, error in points:
            check_real(f"bits per weight in curves[{label!r}]", bits, min=0, min_open=True)
            check_real(f"error in curves[{label!r}]", error, min=0, min_open=True)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + fp16 scale + zero point)")
    ax.set_ylabel("relative error ‖W − Ŵ‖² / ‖W‖²")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return ax
