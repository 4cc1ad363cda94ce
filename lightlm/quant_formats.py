"""Quantization formats beyond the uniform grid, chapter 10: GGUF blocks, NF4 and non-uniform code books.

**GGUF blocks** (llama.cpp, byte for byte): :func:`gguf_quantize` / :func:`gguf_dequantize` read and write Q8_0,
Q4_0 and Q4_1, blocks of 32 weights with an fp16 scale d (and, for Q4_1, an fp16 minimum).

**Code books.** A sorted list of K values c_0 ≤ … ≤ c_{K−1}; a weight is stored as the index of its nearest code,
i(x) = argmin_k |x − c_k| (ties to the lower index), read back as x̂ = c_{i(x)} (:func:`codebook_quantize`,
:func:`codebook_dequantize`). The uniform grid is c_k = s·(k − z); a non-uniform book puts levels where weights are:

* :func:`log2_codebook` — powers of two, {0} ∪ {±2^−k : k = 0, …, 2^(b−1) − 2}: 2^b − 1 levels in [−1, 1]
  (a multiplication by a level is a shift), used after dividing by the absmax like NF4;
* :func:`kmeans_codebook` — Lloyd's algorithm in 1-D: start at evenly spaced quantiles, then alternate assignment
  to the nearest code and c_k ← mean of its cell until nothing moves: a fixed point is a local minimum of the MSE.

**NF4** (QLoRA, Dettmers et al. 2023): per block of B = 64 consecutive weights, scale by the absmax a = max|x| and
store the index of the nearest of 16 *normal-float* levels :data:`NF4_CODE` (quantiles of N(0, 1), rescaled to
[−1, 1], with an exact 0): x̂ = a · NF4[i(x / a)]. Two 4-bit indices share a byte, the FIRST in the HIGH nibble
(the layout of bitsandbytes and torchao; :func:`lightlm.quant.pack_int4` and GGUF order theirs otherwise). The
float32 absmax costs 32/B bits per weight; *double quantization* stores instead, per block of 256 absmaxes, the
int8 values q = clamp(round((a − ā)·f), −128, 127) with f = 128 / max|a − ā| (one float32 f per 256 blocks, one
float32 mean ā per tensor), read back as a' = q / f + ā. Bits per weight (:func:`nf4_bits_per_weight`):
4 + 32/64 = 4.5 without, 4 + 8/64 + 32/(64·256) ≈ 4.127 with double quantization. Only torch is imported.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_bool, check_int, check_tensor

__all__ = ["GGUF_BLOCK", "GGUF_KINDS", "gguf_quantize", "gguf_dequantize", "NF4_CODE", "nf4_quantize",
           "nf4_dequantize", "nf4_bits_per_weight", "nf4_nbytes", "log2_codebook", "kmeans_codebook",
           "codebook_quantize", "codebook_dequantize"]

# --------------------------------------------------------------------------- GGUF blocks (llama.cpp)

GGUF_BLOCK = 32
GGUF_KINDS = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}  # bytes per block of 32 weights


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), computed exactly: torch.round rounds ties to even."""
    magnitude = x.abs()
    whole = magnitude.floor()
    return torch.sign(x) * (whole + (magnitude - whole >= 0.5).to(x.dtype))


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).contiguous().view(torch.uint8)  # (n, 1) -> (n, 2), little-endian


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """32 codes in [0, 15] per block -> 16 bytes: byte j holds code j (low nibble) and code j + 16 (high)."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def gguf_quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The raw GGUF blocks of a float weight (last dimension a multiple of 32): uint8, shape
    ``(*weight.shape[:-1], weight.shape[-1] // 32 * GGUF_KINDS[kind])``, as ``gguf.quants.quantize`` returns them.

    Per block of 32 weights x (all arithmetic in float32, scales stored as fp16):
    Q8_0: d = max|x| / 127, q = roundf(x / d) as int8 (ties away from zero);
    Q4_0: d = −m / 8 with m the weight of largest |x|, q = trunc(x / d + 8.5) clipped to [0, 15];
    Q4_1: d = (max − min) / 15, q = trunc((x − min) / d + 0.5) clipped to [0, 15], min stored too.
    Division is multiplication by 1/d (0 when d = 0), as in llama.cpp; a 4-bit block packs codes j and j + 16
    into byte j.
    """
    weight = check_tensor("weight", weight, kind="float")
    if kind not in GGUF_KINDS:
        raise ValueError(f"unknown GGUF kind {kind!r}; known: {sorted(GGUF_KINDS)}")
    if weight.ndim == 0 or weight.shape[-1] % GGUF_BLOCK:
        raise ValueError(f"the last dimension must be a multiple of {GGUF_BLOCK} (GGUF blocks), got shape "
                         f"{tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite (no NaN or inf) to be quantized")
    x = weight.detach().to(torch.float32).reshape(-1, GGUF_BLOCK)
    if kind == "Q8_0":
        d = x.abs().amax(dim=1, keepdim=True) / 127
    elif kind == "Q4_0":
        extreme = x.gather(1, x.abs().argmax(dim=1, keepdim=True))  # signed: the first of largest magnitude
        d = extreme / -8
    else:
        low = x.amin(dim=1, keepdim=True)
        d = (x.amax(dim=1, keepdim=True) - low) / 15
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    if kind == "Q8_0":
        codes = _round_half_away(x * inverse).to(torch.int8).view(torch.uint8)
        blocks = torch.cat([_fp16_bytes(d), codes], dim=1)
    elif kind == "Q4_0":
        codes = (x * inverse + 8.5).trunc().clamp(0, 15)
        blocks = torch.cat([_fp16_bytes(d), _nibbles(codes)], dim=1)
    else:
        codes = ((x - low) * inverse + 0.5).trunc().clamp(0, 15)
        blocks = torch.cat([_fp16_bytes(d), _fp16_bytes(low), _nibbles(codes)], dim=1)
    return blocks.reshape(*weight.shape[:-1], -1)


def gguf_dequantize(blocks: torch.Tensor, kind: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The float32 weights of raw GGUF blocks (the inverse map of :func:`gguf_quantize`), reshaped to ``shape``."""
    blocks = check_tensor("blocks", blocks)
    if blocks.dtype != torch.uint8:
        raise TypeError(f"blocks must be uint8 (raw bytes), got {blocks.dtype}")
    if kind not in GGUF_KINDS:
        raise ValueError(f"unknown GGUF kind {kind!r}; known: {sorted(GGUF_KINDS)}")
    size = GGUF_KINDS[kind]
    numel = 1
    for n in shape:
        numel *= check_int("shape entries", n, min=0)
    if blocks.numel() != numel // GGUF_BLOCK * size or numel % GGUF_BLOCK:
        raise ValueError(f"{blocks.numel()} bytes of {kind} blocks cannot hold a tensor of shape {tuple(shape)}")
    rows = blocks.contiguous().reshape(-1, size)
    d = rows[:, :2].contiguous().view(torch.float16).to(torch.float32)
    if kind == "Q8_0":
        values = rows[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d
    else:
        packed = rows[:, -16:]
        codes = torch.cat([packed & 0xF, packed >> 4], dim=1).to(torch.float32)
        if kind == "Q4_0":
            values = d * (codes - 8)
        else:
            values = d * codes + rows[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    return values.reshape(tuple(shape))


# --------------------------------------------------------------------------- code books

def _finite(name: str, x: torch.Tensor) -> torch.Tensor:
    x = check_tensor(name, x, kind="float")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite (no NaN or inf) to be quantized")
    return x


def _codebook(codebook: torch.Tensor) -> torch.Tensor:
    codebook = _finite("codebook", codebook)
    if codebook.ndim != 1 or codebook.numel() == 0:
        raise ValueError(f"codebook must be a non-empty 1-D tensor, got shape {tuple(codebook.shape)}")
    if (codebook[1:] < codebook[:-1]).any():
        raise ValueError("codebook must be sorted in ascending order (indices refer to sorted codes)")
    return codebook


def codebook_quantize(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The int64 index of the nearest code for every entry of ``x`` (same shape): i = argmin_k |x − c_k|, ties to
    the lower index, as ``(x[..., None] − c).abs().argmin(-1)`` decides, but in O(n log K) time and O(n) memory.

    ``codebook`` is a sorted 1-D float tensor (compared in ``x``'s dtype). The nearest code is one of the two
    neighbours of x in the sorted book: c_{j−1} < x ≤ c_j (``searchsorted``); the lower one wins a tie.
    """
    x, codebook = _finite("x", x), _codebook(codebook).to(device=x.device, dtype=x.dtype)
    return _nearest(x, codebook)


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    above = torch.searchsorted(codebook, x.detach().contiguous()).clamp(max=codebook.numel() - 1)  # x ≤ c_j
    below = torch.searchsorted(codebook, codebook[(above - 1).clamp(min=0)])   # c_{j−1}, the first of equal codes
    take_below = (x - codebook[below]).abs() <= (x - codebook[above]).abs()     # |x − c_{j−1}| ≤ |x − c_j|
    return torch.where(take_below, below, above)


def _cell_ends(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """ends[k] = how many of the sorted ``values`` have their nearest code at index ≤ k: the nearest index grows
    with x, so one binary search per code (O(K log n)) replaces assigning all n values."""
    k = torch.arange(codes.numel(), device=values.device)
    low, high = torch.zeros_like(k), torch.full_like(k, values.numel())   # the first position past cell k
    for _ in range(values.numel().bit_length()):
        middle = (low + high) // 2
        past = (_nearest(values[middle.clamp(max=values.numel() - 1)], codes) > k) | (middle >= high)  # or found
        low, high = torch.where(past, low, middle + 1), torch.where(past, middle, high)
    return low


def codebook_dequantize(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """x̂ = c_i: the code of every index (in the code book's dtype, on the indices' device)."""
    indices, codebook = check_tensor("indices", indices, kind="int"), _codebook(codebook)
    if indices.numel() and (indices.min() < 0 or indices.max() >= codebook.numel()):
        raise ValueError(f"indices must be in [0, {codebook.numel() - 1}] for a code book of {codebook.numel()} "
                         f"codes, got values in [{indices.min().item()}, {indices.max().item()}]")
    return codebook.to(indices.device)[indices.long()]


def log2_codebook(bits: int) -> torch.Tensor:
    """The power-of-two code book of ``bits`` bits (2 ≤ b ≤ 8), float32, sorted:
    {0} ∪ {±2^−k : k = 0, …, 2^(b−1) − 2}, i.e. 2^b − 1 levels in [−1, 1] (b = 4: 0, ±1, ±½, …, ±1/64)."""
    bits = check_int("bits", bits, min=2, max=8)
    powers = torch.tensor([2.0 ** -k for k in range(2 ** (bits - 1) - 1)], dtype=torch.float32)   # 1, ½, ¼, …
    return torch.cat([-powers, torch.zeros(1), powers.flip(0)])


def kmeans_codebook(x: torch.Tensor, n_codes: int, iters: int = 300) -> torch.Tensor:
    """The sorted code book of ``n_codes`` values that Lloyd's algorithm fits to the entries of ``x``, in x's dtype.

    Deterministic and independent of the order of x's entries: x is sorted first (−0.0 read as 0.0), codes start
    at the values of rank ⌊(k + ½)·n/K⌋, then each of at most ``iters`` rounds assigns every value to its nearest
    code (:func:`codebook_quantize`, ties to the lower index) and sets c_k = mean of its cell (summed in float64,
    rounded to x's dtype); it stops at the first round that changes nothing (a fixed point). A code whose cell is
    empty keeps its value (with fewer distinct values than codes, some codes repeat).
    """
    x = _finite("x", x)
    n_codes = check_int("n_codes", n_codes, min=2, max=2**16)
    iters = check_int("iters", iters, min=0)
    if x.numel() == 0:
        raise ValueError("x must hold at least one value to fit a code book")
    values = x.detach().flatten().sort().values + 0.0                                      # sorted, -0.0 -> 0.0
    sums = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])  # prefix sums
    codes = values[(2 * torch.arange(n_codes, device=x.device) + 1) * values.numel() // (2 * n_codes)]  # quantiles
    for _ in range(iters):
        ends = _cell_ends(values, codes)                                                # sorted values: the
        counts = ends - torch.cat([ends.new_zeros(1), ends[:-1]])                       # cells are runs
        means = ((sums[ends] - sums[ends - counts]) / counts.clamp(min=1)).to(values.dtype)  # c_k = mean of cell k
        means = torch.where(counts > 0, means, codes)                                   # empty cell: keep c_k
        if torch.equal(means, codes):
            break
        codes = means
    return codes.sort().values


# --------------------------------------------------------------------------- NF4 (QLoRA)

NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)


def nf4_bits_per_weight(block_size: int = 64, double_quant: bool = False, scaler_block_size: int = 256) -> float:
    """Storage per weight: 4 + 32/B bits, or 4 + 8/B + 32/(B·S) with double quantization (ā left out)."""
    block_size = check_int("block_size", block_size, min=2)
    scaler_block_size = check_int("scaler_block_size", scaler_block_size, min=1)
    if check_bool("double_quant", double_quant):
        return 4 + 8 / block_size + 32 / (block_size * scaler_block_size)
    return 4 + 32 / block_size


def nf4_nbytes(q: dict) -> int:
    """The bytes of the tensors an :func:`nf4_quantize` dict holds (codes, scales, their scales and mean)."""
    if not isinstance(q, dict):
        raise TypeError(f"q must be the dict nf4_quantize returns, got {type(q).__name__}")
    return sum(t.numel() * t.element_size() for t in q.values() if isinstance(t, torch.Tensor))


def nf4_quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False,
                 scaler_block_size: int = 256) -> dict:
    """NF4 blocks of a float weight (its numel a multiple of ``block_size``, which must be even).

    Returns a dict: ``codes`` (uint8, numel/2: indices into :data:`NF4_CODE` of consecutive weights, the first
    in the high nibble), ``shape``, ``dtype``, ``block_size`` and either ``absmax`` (float32, one per block) or,
    with ``double_quant``, ``absmax_q`` (int8), ``absmax_factor`` (float32 f, one per ``scaler_block_size``
    blocks; the last group may be shorter) and ``absmax_mean`` (float32 ā) plus ``scaler_block_size``.
    Arithmetic in float32, as torchao's ``to_nf4``: x / a then the nearest code; an all-zero block (a = 0)
    stores index 7 (the code 0). A group of absmaxes all equal to ā stores q = 0 with f = 1.
    """
    weight = _finite("weight", weight)
    block_size = check_int("block_size", block_size, min=2)
    scaler_block_size = check_int("scaler_block_size", scaler_block_size, min=1)
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes per byte), got {block_size}")
    if weight.numel() == 0 or weight.numel() % block_size:
        raise ValueError(f"block_size={block_size} must divide the number of weights, {weight.numel()} "
                         f"(shape {tuple(weight.shape)}): a block may not be cut")
    blocks = weight.detach().to(torch.float32).reshape(-1, block_size)           # (n_blocks, B)
    absmax = blocks.abs().amax(dim=1)                                            # a = max|x| per block
    scaled = blocks / torch.where(absmax == 0, 1.0, absmax)[:, None]             # x / a in [−1, 1]
    indices = codebook_quantize(scaled, NF4_CODE).to(torch.uint8).flatten()     # nearest NF4 level
    q = {"codes": indices[0::2] << 4 | indices[1::2], "shape": tuple(weight.shape), "dtype": weight.dtype,
         "block_size": block_size}
    if not check_bool("double_quant", double_quant):
        return {**q, "absmax": absmax}
    mean, n_groups = absmax.mean(), math.ceil(absmax.numel() / scaler_block_size)  # ā, groups of S absmaxes
    centred = torch.nn.functional.pad(absmax - mean, (0, n_groups * scaler_block_size - absmax.numel()))
    centred = centred.reshape(n_groups, scaler_block_size)                       # a − ā, padded with zeros
    spread = centred.abs().amax(dim=1, keepdim=True)                             # max|a − ā| per group
    factor = torch.where(spread == 0, 1.0, 256 / (2 * spread))                   # f = 128 / max|a − ā|
    absmax_q = (centred * factor).round().clamp(-128, 127).to(torch.int8)        # round half to even
    return {**q, "absmax_q": absmax_q.flatten()[:absmax.numel()], "absmax_factor": factor.flatten(),
            "absmax_mean": mean, "scaler_block_size": scaler_block_size}


def nf4_dequantize(q: dict) -> torch.Tensor:
    """The weight x̂ = a · NF4[i] of an :func:`nf4_quantize` dict, in its shape and dtype; with double
    quantization a' = q / f + ā replaces the absmax a."""
    keys = ("codes", "shape", "dtype", "block_size")
    if not isinstance(q, dict) or any(k not in q for k in keys) or not ("absmax" in q or "absmax_q" in q):
        raise ValueError(f"q must be the dict nf4_quantize returns (keys {', '.join(keys)} and absmax or absmax_q)")
    codes = check_tensor("q['codes']", q["codes"])
    if codes.dtype != torch.uint8:
        raise TypeError(f"q['codes'] must be uint8 (two 4-bit codes per byte), got {codes.dtype}")
    absmax = q.get("absmax")
    if absmax is None:
        factor = q["absmax_factor"].repeat_interleave(q["scaler_block_size"])[:q["absmax_q"].numel()]
        absmax = q["absmax_q"] / factor + q["absmax_mean"]                            # a' = q / f + ā
    indices = torch.stack([codes >> 4, codes & 0xF], dim=-1).flatten().long()     # high nibble first
    if indices.numel() != absmax.numel() * q["block_size"] or indices.numel() != math.prod(q["shape"]):
        raise ValueError(f"{codes.numel()} bytes of codes and {absmax.numel()} scales do not make a weight of "
                         f"shape {tuple(q['shape'])} in blocks of {q['block_size']}")
    values = NF4_CODE.to(codes.device)[indices].reshape(absmax.numel(), -1) * absmax[:, None]  # a · NF4[i]
    return values.reshape(q["shape"]).to(q["dtype"])
