"""The decode loop's linear projections, in the orientation that is fast for a few rows.

A decode step projects a handful of rows at a time: one query per running row, or a few
stacked positions in FREE's parallel pass and the self-speculative verification. On CPU, torch's
`F.linear` (x W^T, MKL) is slow for 2 to 64 rows: on this 2-core machine it costs about as much
per row as one matrix-vector product up to 4 rows, while the same product computed as (W x^T)^T
reads W once and costs 1.1-1.5x one row (bench/bench_kernels.py prints both). At one row both
are the same matrix-vector product, bit for bit, except against a weight too large to stay in
cache (the LM head): MKL's matrix-vector product streams it on one thread (6.4 ms for T5-large's
head), so the row is computed twice as a 2-row product instead (3.1 ms). Other devices keep
`F.linear`.

`feed_forward` is T5's feed-forward sublayer (plain or gated) with these projections; it
follows transformers' T5LayerFF step for step (layer norm, activation, dropout, the cast to
`wo`'s dtype kept in float32 for 8-bit checkpoints, residual).
"""

import torch

# Above this many weights a matrix-vector product is slower than a 2-row product (measured:
# 4096x1024 0.25 against 0.28 ms, 8192x1024 1.54 against 0.68 ms).
STREAMED_WEIGHTS = 1 << 22


def project(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x (..., d_in); on CPU as (W x^T)^T. Anything but a plain nn.Linear (an
    adapter, a quantised layer) is called as it is."""
    if x.device.type != "cpu" or type(layer) is not torch.nn.Linear:
        return layer(x)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1 and layer.weight.numel() > STREAMED_WEIGHTS:
        out = torch.matmul(layer.weight, torch.cat([flat, flat]).T)[:, :1].T.contiguous()
    else:
        out = torch.matmul(layer.weight, flat.T).T.contiguous()
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def feed_forward(ff_layer, hidden: torch.Tensor) -> torch.Tensor:
    """T5LayerFF(hidden): hidden + FF(norm(hidden)), FF = wo(act(wi x)) or wo(act(wi_0 x) * wi_1 x)."""
    dense = ff_layer.DenseReluDense
    normed = ff_layer.layer_norm(hidden)
    if hasattr(dense, "wi_0"):  # gated (T5 v1.1, Flan-T5, mT5, LongT5)
        inner = dense.act(project(dense.wi_0, normed)) * project(dense.wi_1, normed)
    else:
        inner = dense.act(project(dense.wi, normed))
    inner = dense.dropout(inner)
    if inner.dtype != dense.wo.weight.dtype and dense.wo.weight.dtype != torch.int8:
        inner = inner.to(dense.wo.weight.dtype)
    return hidden + ff_layer.dropout(project(dense.wo, inner))
