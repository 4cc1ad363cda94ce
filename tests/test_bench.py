"""lightlm.bench: peak memory against known allocation sizes, and timing with a baseline (CPU; CUDA where
present)."""

import time

import pytest
import torch

from lightlm import bench

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_peak_memory_sees_a_large_temporary():
    def make_and_drop():
        big = torch.ones(1000, 1000)  # 4,000,000 bytes
        return big.sum().item()

    result, peak = bench.peak_memory(make_and_drop)
    assert result == 1e6
    assert 4_000_000 <= peak < 4_100_000


def test_peak_memory_counts_what_is_live_at_once():
    def sequential():
        for _ in range(3):
            x = torch.ones(250, 1000)  # 1 MB, freed before the next one is made
            del x

    def together():
        kept = [torch.ones(250, 1000) for _ in range(3)]
        return len(kept)

    assert bench.peak_memory(sequential)[1] < 1_100_000
    assert bench.peak_memory(together)[1] >= 3_000_000


def test_peak_memory_shows_naive_attention_holds_the_score_matrix():
    q = torch.randn(1, 4, 512, 32)
    scores_bytes = 4 * 512 * 512 * 4

    def naive():
        return (q @ q.transpose(-2, -1)).softmax(-1) @ q

    assert bench.peak_memory(naive)[1] >= scores_bytes
    fused = bench.peak_memory(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))[1]
    assert fused < scores_bytes


def test_benchmark_reports_median_and_ratio_of_two_callables():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.001)

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    timing = bench.benchmark(fast, baseline=slow, warmup=2, repeat=5)
    assert calls == {"fast": 7, "slow": 7}
    assert len(timing.times) == len(timing.baseline_times) == 5
    assert timing.baseline_median >= 0.02 and timing.median >= 0.001
    assert timing.ratio > 3
    assert "ratio" in str(timing)
    assert bench.benchmark(fast, repeat=1).ratio is None


def test_timing_says_which_device_it_measured():
    assert bench.benchmark(lambda: None, warmup=0, repeat=1).device == "cpu"


@CUDA
def test_peak_memory_on_cuda_sees_a_large_temporary_on_the_gpu():
    def make_and_drop():
        big = torch.ones(1000, 1000, device="cuda")  # 4,000,000 bytes (rounded up to 512-byte units)
        return big.sum().item()

    result, peak = bench.peak_memory(make_and_drop, device="cuda")
    assert result == 1e6
    assert 4_000_000 <= peak < 4_000_000 + 2 * 2**20
    cpu_result, cpu_peak = bench.peak_memory(make_and_drop)  # the CPU allocator sees none of it
    assert cpu_result == 1e6 and cpu_peak < 1000


@CUDA
def test_benchmark_on_cuda_waits_for_the_gpu():
    a = torch.randn(4096, 4096, device="cuda")

    def work():
        for _ in range(20):
            a @ a  # about 2.7 TFLOP in all; launching it takes microseconds, running it milliseconds

    synced = bench.benchmark(work, warmup=1, repeat=3, device="cuda")
    start = time.perf_counter()
    work()
    launch_only = time.perf_counter() - start
    torch.cuda.synchronize()
    assert synced.device == f"cuda:{torch.cuda.current_device()}"
    elapsed = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    elapsed[0].record()
    work()
    elapsed[1].record()
    torch.cuda.synchronize()
    gpu_seconds = elapsed[0].elapsed_time(elapsed[1]) / 1e3  # CUDA events: the GPU's own clock
    assert synced.median >= 0.9 * gpu_seconds > launch_only


@pytest.fixture
def fake_cuda(monkeypatch):
    """A stand-in for torch.cuda on a machine without a GPU: it records what bench asks of it, so the CUDA
    protocol (synchronise around every timed call, read the allocator's peak) is checked here too; the
    tests marked CUDA above check it against a real GPU."""
    log = []
    allocated = {"now": 1000, "peak": 1000}
    fake = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "synchronize": lambda device=None: log.append(("sync", str(device))),
        "memory_allocated": lambda device=None: allocated["now"],
        "max_memory_allocated": lambda device=None: allocated["peak"],
        "reset_peak_memory_stats": lambda device=None: allocated.update(peak=allocated["now"]),
    }
    for name, function in fake.items():
        monkeypatch.setattr(torch.cuda, name, function)
    return log, allocated


def test_benchmark_on_cuda_synchronises_before_and_after_every_timed_call(fake_cuda):
    log, _ = fake_cuda
    timing = bench.benchmark(lambda: log.append("fn"), baseline=lambda: log.append("base"), warmup=1, repeat=2,
                             device="cuda")
    assert timing.device == "cuda:0"
    timed = log[2:]  # after the untimed warm-up calls of fn and baseline
    assert log[:2] == ["fn", "base"]
    assert timed == [("sync", "cuda:0"), "fn", ("sync", "cuda:0"), ("sync", "cuda:0"), "base", ("sync", "cuda:0"),
                     ("sync", "cuda:0"), "base", ("sync", "cuda:0"), ("sync", "cuda:0"), "fn", ("sync", "cuda:0")]


def test_peak_memory_on_cuda_reports_the_allocators_peak_above_the_start(fake_cuda):
    log, allocated = fake_cuda

    def work():
        allocated.update(peak=allocated["now"] + 5000)  # 5000 bytes more at the worst moment
        return "done"

    assert bench.peak_memory(work, device=torch.device("cuda", 0)) == ("done", 5000)
    assert log[-1] == ("sync", "cuda:0")  # waited for the GPU before reading the peak
    with pytest.raises(ValueError, match="'cuda:1' does not exist; this machine has 1 CUDA device"):
        bench.peak_memory(work, device="cuda:1")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: bench.benchmark(lambda: None, repeat=0), ValueError, "repeat must be >= 1, got 0"),
        (lambda: bench.benchmark(lambda: None, warmup=-1), ValueError, "warmup must be >= 0, got -1"),
        (lambda: bench.benchmark(lambda: None, warmup=True), TypeError, "warmup must be an int, got bool"),
        (lambda: bench.benchmark(lambda: None, repeat=2.0), TypeError, "repeat must be an int, got float"),
        (lambda: bench.benchmark("fn"), TypeError, "fn must be callable, got str"),
        (lambda: bench.benchmark(lambda: None, baseline=3), TypeError, "baseline must be callable, got int"),
        (lambda: bench.benchmark(lambda: None, device="tpu"), ValueError, "device must name a device"),
        (lambda: bench.benchmark(lambda: None, device="meta"), ValueError, "'cpu' or a CUDA device, got 'meta'"),
        (lambda: bench.peak_memory("fn"), TypeError, "fn must be callable, got str"),
        (lambda: bench.peak_memory(lambda: None, device=0), TypeError, "device must be a str or torch.device"),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        bench.peak_memory(lambda: None, device="cuda")


class _Clock:
    """A fake perf_counter that advances ``step`` s per reading: every timed call (stop − start) takes ``step``."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def test_peak_matmul_flops_is_two_n_cubed_over_the_median_time(monkeypatch):
    monkeypatch.setattr(bench.time, "perf_counter", _Clock(0.5))
    assert bench.peak_matmul_flops(n=64, repeat=3) == pytest.approx(2 * 64**3 / 0.5)


@pytest.mark.parametrize("op, moved", [("read", 1), ("copy", 2)])
def test_memory_bandwidth_counts_the_bytes_each_op_moves(monkeypatch, op, moved):
    monkeypatch.setattr(bench.time, "perf_counter", _Clock(0.25))
    assert bench.memory_bandwidth(4096, op=op, repeat=3) == pytest.approx(moved * 4096 / 0.25)


def test_matvec_bandwidth_counts_whole_rows_of_the_matrix(monkeypatch):
    monkeypatch.setattr(bench.time, "perf_counter", _Clock(0.25))
    # 3 rows of 2,048 fp32 values fit in 30,000 bytes: 24,576 bytes are read per call
    assert bench.memory_bandwidth(30_000, op="matvec", repeat=3) == pytest.approx(3 * 2048 * 4 / 0.25)


def test_roofs_measured_on_this_machine_are_positive_and_finite():
    flops, bandwidth = bench.peak_matmul_flops(n=128, repeat=1), bench.memory_bandwidth(2**20, repeat=1)
    assert 0 < flops < float("inf") and 0 < bandwidth < float("inf")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: bench.peak_matmul_flops(n=0), ValueError, "n must be >= 1, got 0"),
        (lambda: bench.peak_matmul_flops(n=2.5), TypeError, "n must be an int, got float"),
        (lambda: bench.memory_bandwidth(2, repeat=1), ValueError, "n_bytes must be >= 4, got 2"),
        (lambda: bench.memory_bandwidth(4096, op="write"), ValueError, "op must be one of 'read', 'matvec', 'copy'"),
        (lambda: bench.memory_bandwidth(4096, op="matvec"), ValueError, "at least one row of 2,048"),
        (lambda: bench.memory_bandwidth(4096, op=1), TypeError, "op must be a str"),
        (lambda: bench.peak_matmul_flops(device="tpu"), ValueError, "device must name a device"),
    ],
)
def test_roof_measurements_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
