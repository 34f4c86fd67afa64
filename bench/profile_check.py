"""One confidence check in isolation (weights hot in cache), T5-large shape: where its time goes.

    .venv/bin/python bench/profile_check.py

Times, in microseconds per call, a full-head check at the start layer, a fixed-reduction check at
k(7) = 842 after it, and their pieces, next to the feed-forward sub-layer of one block. Inside the
decode loop a check reads its rows of W from memory after a block has evicted them, so
bench_confidence.py's in-loop ratio is the one to quote; this one shows the floor.
"""

import time

import torch

from common import build_model
from models.confidence import softmax_confidence_values
from models.layer_scorer import LayerScorer
from util.additional_args import AdditionalArguments


def per_call_us(fn, calls=200):
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


@torch.inference_mode()
def main():
    model = build_model("t5-large")
    args = AdditionalArguments(use_early_exit=True, exit_conf_type="softmax", exit_min_layer=7,
                               type_vocab_reduct="fixed")
    scorer = LayerScorer(model, args, "softmax")
    hidden = torch.randn(1, 1, model.config.d_model)
    rows = {}
    rows["full-head check (start layer)"] = per_call_us(
        lambda: (scorer.start_step(None), scorer.confidence(7, hidden, hidden)), 20)
    scorer.start_step(None)
    scorer.confidence(7, hidden, hidden)
    rows["reduced check (842 rows)"] = per_call_us(lambda: scorer.confidence(8, hidden, hidden))
    normed = scorer.normed(hidden)
    rows["  of which: final norm and scaling (one rms_norm call)"] = per_call_us(lambda: scorer.normed(hidden))
    rows["  of which: head over 842 rows"] = per_call_us(lambda: scorer.reduced.logits(normed, [scorer.reduced.k_start]))
    logits = scorer.reduced.logits(normed, [scorer.reduced.k_start])
    rows["  of which: softmax, top-2 and host read"] = per_call_us(lambda: softmax_confidence_values(logits))
    feed_forward = model.decoder.block[3].layer[2]
    rows["feed-forward sub-layer of one block"] = per_call_us(lambda: feed_forward(hidden))
    for name, micros in rows.items():
        print(f"{name:45} {micros:9.0f} us")


if __name__ == "__main__":
    main()
