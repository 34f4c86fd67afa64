"""The decode loop's linear projections and layer norms, each computed the way that measured
faster on the machine at hand.

A decode step projects a handful of rows at a time: one query per running row, or a few stacked
positions in FREE's parallel pass and the self-speculative verification. On CPU, torch's
`F.linear` (x W^T) can be slow there, and the same product computed as (W x^T)^T (a single row as
a 2-row product) can be 2x faster: on one 2-core machine a T5-large 4096x1024 projection of 1 row
took 0.79 ms with F.linear and 0.40 ms as W x^T. On another machine of the same kind the W x^T
path was 0.63-0.88x F.linear's speed instead, and 2-3x slower at 1 thread. No fixed rule holds,
so each choice is measured:

- `project`: on CPU, for a weight of at least SMALL_WEIGHTS entries and at most MAX_CALIBRATED_ROWS
  rows, the first call for a (weight shape, dtype, row count, threads) times both ways on a cold
  weight (the caches flushed before each call, as in decoding, where no block's weights are still
  in cache when the next token reaches it), CALIBRATION_ROUNDS each, interleaved, and takes W x^T
  only where its median is under MARGIN of F.linear's (on a shared, noisy machine a close call
  stays with F.linear); the choice is cached for the process (`CHOICES`). Anything else calls
  F.linear. A calibration takes tens of milliseconds per key, paid inside the first generate
  call that meets it (benchmarks warm up first).
- `layer_norm`: T5's RMS norm in float32, as one `F.rms_norm` op (the same bits on CPU) or the
  module's six ops, likewise measured per (width, row count, threads) on first use (cache-hot:
  a norm's weight is a few KiB).

Results of the two projections differ in the last bits only (summation order): tokens and exit
layers are the same except where a confidence or a top-2 logit gap sits within that rounding.
"""

import statistics
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from transformers.models.longt5.modeling_longt5 import LongT5LayerNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

# Below this many weights (1 MiB in float32: the demo model's blocks) a projection is cheap
# wherever its weight is, and the reshapes and copies of W x^T would cost more than they save
# (a 128x512 weight, 1 row: 8 us with F.linear, 17 us as W x^T): F.linear, not measured.
SMALL_WEIGHTS = 1 << 18
MAX_CALIBRATED_ROWS = 32  # more rows (a source's cross-attention keys): a matrix product F.linear does well
CALIBRATION_ROUNDS = 7
MARGIN = 0.9  # the alternative must take under 0.9x the default's median: noise alone leaves the default
FLUSH_BYTES = 64 << 20  # read between timed calls: larger than the last-level caches of the CPUs in use

CHOICES: Dict[Tuple, bool] = {}  # (what, shape, dtype, rows, threads) -> True: the alternative (W x^T, rms_norm)
_flush_buffer = None


def _flush_caches() -> None:
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.ones(FLUSH_BYTES // 4)
    _flush_buffer.sum()


def _faster(first, second, cold: bool = True) -> bool:
    """Whether second() is clearly faster than first() (MARGIN), by median of interleaved timed
    calls, each after a cache flush when `cold`."""
    seconds = ([], [])
    with torch.no_grad():
        first(), second()  # warm-up: allocations, first-call dispatch
        for _ in range(CALIBRATION_ROUNDS):
            for fn, times in zip((first, second), seconds):
                if cold:
                    _flush_caches()
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
    return statistics.median(seconds[1]) < MARGIN * statistics.median(seconds[0])


def _transposed(weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    rows = flat.shape[0]
    if rows == 1:  # a 2-row product: a matrix-vector product would stream W on one thread
        flat = torch.cat([flat, flat])
    return torch.matmul(weight, flat.T).T[:rows]


def _inputs() -> torch.Generator:
    """Calibration inputs come from a generator of their own: drawing them from torch's global one
    would change what a seeded caller samples after the first call."""
    return torch.Generator().manual_seed(0)


def uses_transposed(weight: torch.Tensor, rows: int) -> bool:
    """The measured choice for this weight and row count (measuring it on first use)."""
    if weight.device.type != "cpu" or weight.numel() < SMALL_WEIGHTS or rows > MAX_CALIBRATED_ROWS:
        return False
    key = ("project", tuple(weight.shape), weight.dtype, rows, torch.get_num_threads())
    if key not in CHOICES:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=_inputs())
        CHOICES[key] = _faster(lambda: F.linear(x, weight), lambda: _transposed(weight, x))
    return CHOICES[key]


def project(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x (..., d_in), as F.linear or as (W x^T)^T, whichever measured faster here.
    Anything but a plain nn.Linear (an adapter, a quantised layer) is called as it is."""
    if type(layer) is not torch.nn.Linear:
        return layer(x)
    rows = x.numel() // x.shape[-1]
    if not uses_transposed(layer.weight, rows):
        return F.linear(x, layer.weight, layer.bias)  # what the module computes, without its call overhead
    out = _transposed(layer.weight, x.reshape(rows, x.shape[-1])).contiguous()
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def layer_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for T5's RMS layer norm; in float32 either as one rms_norm op, which on CPU gives
    the same bits as T5LayerNorm's six ops and module call (tests/test_projection.py), or as the
    module, whichever measured faster here (a decode step calls it 3 times per block). Other
    dtypes keep the module: it computes the variance in float32 whatever the input's dtype."""
    if type(norm) not in (T5LayerNorm, LongT5LayerNorm) or not x.dtype == norm.weight.dtype == torch.float32:
        return norm(x)
    if uses_fused_norm(norm, x.numel() // x.shape[-1], x.device):
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


def uses_fused_norm(norm: torch.nn.Module, rows: int, device: torch.device) -> bool:
    """The measured choice for this norm's width and row count (measuring it on first use); off
    CPU the fused op, one kernel launch instead of six."""
    if device.type != "cpu":
        return True
    key = ("rms_norm", tuple(norm.weight.shape), norm.weight.dtype, min(rows, MAX_CALIBRATED_ROWS + 1),
           torch.get_num_threads())
    if key not in CHOICES:
        x = torch.randn(rows, norm.weight.shape[0], generator=_inputs())
        fused = lambda: F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
        CHOICES[key] = _faster(lambda: norm(x), fused, cold=False)  # a norm's weight is small: in cache
    return CHOICES[key]


def feed_forward(ff_layer, hidden: torch.Tensor) -> torch.Tensor:
    """T5LayerFF(hidden): hidden + FF(norm(hidden)), FF = wo(act(wi x)) or wo(act(wi_0 x) * wi_1 x)."""
    dense = ff_layer.DenseReluDense
    normed = layer_norm(ff_layer.layer_norm, hidden)
    if hasattr(dense, "wi_0"):  # gated (T5 v1.1, Flan-T5, mT5, LongT5)
        inner = dense.act(project(dense.wi_0, normed)) * project(dense.wi_1, normed)
    else:
        inner = dense.act(project(dense.wi, normed))
    inner = dense.dropout(inner)
    if inner.dtype != dense.wo.weight.dtype and dense.wo.weight.dtype != torch.int8:
        inner = inner.to(dense.wo.weight.dtype)
    return hidden + ff_layer.dropout(project(dense.wo, inner))
