"""Measuring a running computation: peak memory and wall-clock time (chapter 1, "Measuring what lightweight
means"). The arithmetic that needs no running code (parameters, bytes, FLOPs) is in :mod:`lightlm.cost`.

Both functions take a zero-argument callable and a ``device``: ``"cpu"`` (the default) measures torch's CPU
allocator and plain wall-clock time; ``"cuda"`` (or ``"cuda:1"``) measures that GPU: its allocator's peak,
and times with ``torch.cuda.synchronize`` around each call, because CUDA kernels run asynchronously and a
timer stopped without waiting measures only the launch. Work on another device than the one named is not
seen (a CPU measurement of a GPU model sees only its CPU-side tensors).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ._checks import check_callable, check_choice, check_int

__all__ = ["peak_memory", "Timing", "benchmark", "peak_matmul_flops", "memory_bandwidth"]


def _device(device: Any) -> torch.device:
    """A validated ``torch.device``: CPU, or a CUDA device that exists on this machine."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must name a device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but torch sees no CUDA GPU; measure with device='cpu'")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


# --------------------------------------------------------------------------- peak memory


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side logs "profiler_start/stop" lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # An op reports the memory it and its children allocated, so each op contributes its *self* memory
    # (its total minus its children's); a free outside any op appears as a "[memory]" event.
    events = [e for e in prof.events() if e.self_cpu_memory_usage]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage  # positive for an allocation, negative for a free
        peak = max(peak, live)
    return result, peak


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def peak_memory(fn: Callable[[], Any], *, device: str | torch.device = "cpu") -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``: the largest amount of tensor memory on ``device``
    that was live at once during the call, beyond what was allocated before it.

    * ``device="cpu"``: measured with ``torch.profiler`` (``profile_memory=True``), which records the
      allocations and frees of torch's CPU allocator op by op; the peak is the maximum of their running sum.
      A buffer that an operator allocates and frees inside itself nets to zero at this granularity.
    * ``device="cuda"``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
      memory allocated before the call (the caching allocator's reserved-but-free blocks are not counted).
    """
    check_callable("fn", fn)
    device = _device(device)
    return _cpu_peak(fn) if device.type == "cpu" else _cuda_peak(fn, device)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Result of :func:`benchmark`, in seconds. ``ratio`` = baseline median / median (a speed-up when > 1)."""

    median: float
    times: list[float] = field(repr=False)
    baseline_median: float | None = None
    baseline_times: list[float] | None = field(default=None, repr=False)
    device: str = "cpu"

    @property
    def ratio(self) -> float | None:
        return None if self.baseline_median is None else self.baseline_median / self.median

    def __str__(self) -> str:
        text = f"median {self.median * 1e3:.2f} ms over {len(self.times)} runs"
        if self.ratio is not None:
            text += f"; baseline {self.baseline_median * 1e3:.2f} ms; ratio {self.ratio:.2f}x"
        return text


def benchmark(fn: Callable[[], Any], *, baseline: Callable[[], Any] | None = None, warmup: int = 2,
              repeat: int = 7, device: str | torch.device = "cpu") -> Timing:
    """Time a zero-argument callable: ``warmup`` untimed calls, then the median of ``repeat`` timed calls.

    With ``baseline``, both are timed in alternating order in the same loop, so a slow moment of a shared
    machine hits both alike, and ``Timing.ratio`` gives baseline / fn. Wrap calls in ``torch.inference_mode``
    yourself when timing inference. With a CUDA ``device`` each timed call is bracketed by
    ``torch.cuda.synchronize(device)``, so the time includes the GPU's work, not only the kernel launches.
    """
    check_callable("fn", fn)
    if baseline is not None:
        check_callable("baseline", baseline)
    warmup = check_int("warmup", warmup, min=0)
    repeat = check_int("repeat", repeat, min=1)
    device = _device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    callables = [fn] if baseline is None else [fn, baseline]
    for _ in range(warmup):
        for call in callables:
            call()
    times: list[list[float]] = [[] for _ in callables]
    for round_ in range(repeat):
        order = range(len(callables)) if round_ % 2 == 0 else reversed(range(len(callables)))
        for index in order:
            sync()
            start = time.perf_counter()
            callables[index]()
            sync()
            times[index].append(time.perf_counter() - start)
    baseline_median = None if baseline is None else statistics.median(times[1])
    return Timing(statistics.median(times[0]), times[0], baseline_median, times[1] if baseline else None,
                  device=str(device))


# --------------------------------------------------------------------------- the two roofs of a roofline


def peak_matmul_flops(n: int = 1024, *, repeat: int = 3, device: str | torch.device = "cpu") -> float:
    """Measured FLOP/s of one large fp32 matrix product: ``2·n³`` FLOPs over the median time of ``A @ B``
    (n × n each), after one warm-up call; the compute roof of a roofline (chapter 1).

    A product this size runs near the best the hardware and torch's BLAS reach, so it estimates the peak
    that real models can hope for, not the vendor's theoretical number. Machine-dependent: print it,
    never assert it.
    """
    n = check_int("n", n, min=1)
    device = _device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator, device=device) for _ in range(2))
    return 2 * n**3 / benchmark(lambda: a @ b, warmup=1, repeat=repeat, device=device).median


def memory_bandwidth(n_bytes: int = 2**27, *, op: str = "read", repeat: int = 5,
                     device: str | torch.device = "cpu") -> float:
    """Measured memory bandwidth in bytes/s over an fp32 tensor of ``n_bytes``; the memory roof (chapter 1).

    ``op="read"``: ``x.sum()`` reads every byte once (``n_bytes`` moved), as a decoding step reads the weights.
    ``op="matvec"``: ``torch.mv`` of an ``n_bytes`` fp32 matrix (2,048 columns) by a vector, the very operation of
    a decoding step at batch 1 (``n_bytes`` moved; the vector and the result are negligible).
    ``op="copy"``: ``y.copy_(x)`` reads and writes (``2·n_bytes`` moved). The median of ``repeat`` calls after
    one warm-up. Take ``n_bytes`` well above the last-level cache, or the cache's bandwidth is measured
    instead (the default, 134 MB, is four times a 32 MiB L3). Machine-dependent: print it, never assert it.
    """
    n_bytes = check_int("n_bytes", n_bytes, min=4)
    if not isinstance(op, str):
        raise TypeError(f"op must be a str, 'read', 'matvec' or 'copy', got {type(op).__name__}")
    op = check_choice("op", op, ("read", "matvec", "copy"))
    device = _device(device)
    if op == "matvec":
        if n_bytes < 4 * 2048:
            raise ValueError(f"n_bytes must hold at least one row of 2,048 fp32 values for op='matvec', got {n_bytes}")
        matrix, vector = torch.ones(n_bytes // (4 * 2048), 2048, device=device), torch.ones(2048, device=device)
        return matrix.numel() * 4 / benchmark(lambda: torch.mv(matrix, vector), warmup=1, repeat=repeat,
                                              device=device).median
    x = torch.ones(n_bytes // 4, device=device)
    if op == "read":
        return x.numel() * 4 / benchmark(x.sum, warmup=1, repeat=repeat, device=device).median
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / benchmark(lambda: y.copy_(x), warmup=1, repeat=repeat, device=device).median
