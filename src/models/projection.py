"""The decode loop's linear projections and layer norms, computed the way that is fast for a few rows.

A decode step projects a handful of rows at a time: one query per running row, or a few
stacked positions in FREE's parallel pass and the self-speculative verification. On CPU, torch's
`F.linear` (x W^T, MKL) is slow there: for 2 to 4 rows it costs about one matrix-vector product
per row, and the matrix-vector product itself, on weights that are not in cache (a decoder's
blocks and head never are), streams W on one thread. The same product computed as (W x^T)^T
reads W once with both threads: a T5-large 4096x1024 projection of 1 row costs 0.79 ms with
F.linear and 0.40 ms as a 2-row W x^T, of 2 rows 1.64 against 0.44 ms (bench/bench_kernels.py,
weights cycled so that none stays in cache). So on CPU every projection of a weight of at least
SMALL_WEIGHTS goes as W x^T, and a single row is computed as a 2-row product (the row twice).
Results differ from F.linear's in the last bits only (summation order). Other devices, and small
weights, call `F.linear` directly (a module call costs more than a small product's work).

`layer_norm` is T5's RMS norm as one op in float32 (the same bits on CPU). On the demo's small
model, where an op costs more in overhead than in work, the two made decoding 5–10% faster
(README, the demo's table).

`feed_forward` is T5's feed-forward sublayer (plain or gated) with these projections; it
follows transformers' T5LayerFF step for step (layer norm, activation, dropout, the cast to
`wo`'s dtype kept in float32 for 8-bit checkpoints, residual).
"""

import torch
import torch.nn.functional as F
from transformers.models.longt5.modeling_longt5 import LongT5LayerNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

# Below this many weights (1 MiB in float32: the demo model's blocks) a projection is cheap
# wherever its weight is, and the reshapes and copies here would cost more than they save
# (a 128x512 weight, 1 row: 8 us with F.linear, 17 us here).
SMALL_WEIGHTS = 1 << 18


def project(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x (..., d_in); on CPU as (W x^T)^T. Anything but a plain nn.Linear (an
    adapter, a quantised layer) is called as it is, and so is a small one."""
    if type(layer) is not torch.nn.Linear:
        return layer(x)
    if x.device.type != "cpu" or layer.weight.numel() < SMALL_WEIGHTS:
        return F.linear(x, layer.weight, layer.bias)  # what the module computes, without its call overhead
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:  # not a matrix-vector product: see the module docstring
        flat = torch.cat([flat, flat])
    out = torch.matmul(layer.weight, flat.T).T[:rows].contiguous()
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def layer_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for T5's RMS layer norm; in float32 as one rms_norm op, which on CPU gives the same
    bits as T5LayerNorm's six ops and module call (tests/test_projection.py); a decode step calls
    it 3 times per block. Other dtypes keep the module: it computes the variance in float32
    whatever the input's dtype."""
    if type(norm) in (T5LayerNorm, LongT5LayerNorm) and x.dtype == norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


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
