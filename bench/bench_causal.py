"""Decoder-only models in the decode loop against HF `generate`, on Llama shapes (random weights).

    .venv/bin/python bench/bench_causal.py [--shapes llama-small,llama-1b] [--batches 1,8]
        [--prompt 128] [--new-tokens 32] [--rounds 2] [--parts engine,speculation,checks]

Parts, each timed side by side in interleaved rounds (medians):
  engine       HF generate vs our loop, full model and static exit at L/2 (HF: the model cut to its
               first L/2 layers), batch 1 and 8, left-padded prompts of 0.75-1.0 x --prompt tokens.
               Targets: ours <= 1.0x HF's time (full); our static speed-up >= 0.9 of HF's.
  speculation  lossless self-speculation (ours) against HF's generate(assistant_early_exit=k) on the
               same weights, batch 1; agreement of layer k with the full model set by scaling the
               deep layers' output projections. Identical outputs; tokens/s against HF's assisted run
               and against our full model, at about 80% and 50% acceptance.
  checks       a softmax confidence check after every layer (threshold 1: no token exits) with the
               full head and with decaying vocabulary reduction, on the 128k vocabulary: the check's
               time as a fraction of a block's, and its FLOPs against the unreduced check's.
"""

import argparse
import contextlib
import types

import torch
from transformers import GenerationMixin, LlamaConfig

from common import configure, median, print_table, run_side_by_side, save_results
from models.deploying_causal import DeployLlamaForCausalLM

SHAPES = {
    "llama-small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=32000),
    # Llama 3.2 1B: d 2048, 16 layers, 32 query / 8 key-value heads, vocabulary 128,256
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True),
}


def build(shape: str, seed: int = 0):
    config = LlamaConfig(**SHAPES[shape], eos_token_id=None, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(seed)
    model = DeployLlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(model, batch: int, length: int, seed: int = 1):
    """Left-padded prompts of 0.75..1.0 x length tokens (equal lengths at batch 1)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [length] if batch == 1 else [length - (length // 4) * i // max(batch - 1, 1) for i in range(batch)]
    ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, length - n:] = torch.randint(2, model.config.vocab_size, (n,), generator=generator)
        mask[b, length - n:] = 1
    return ids, mask


def hf_generate(model, **kwargs):
    """HF's own generate on our model's weights; its assisted generation calls `generate` of the
    model again for the drafts, so HF's is the instance's while it runs."""
    model.generate = types.MethodType(GenerationMixin.generate, model)
    try:
        return model.generate(do_sample=False, num_beams=1, **kwargs)
    finally:
        del model.generate


@contextlib.contextmanager
def cut_to(model, layers: int):
    """The same model cut to its first `layers` blocks, as HF runs it (weights shared)."""
    full_layers, full_count = model.model.layers, model.config.num_hidden_layers
    model.model.layers = torch.nn.ModuleList(list(full_layers)[:layers])
    model.config.num_hidden_layers = layers
    try:
        yield model
    finally:
        model.model.layers, model.config.num_hidden_layers = full_layers, full_count


# ----- engine -------------------------------------------------------------------------------------
def bench_engine(shape, batches, args):
    model = build(shape)
    L = model.config.num_hidden_layers
    k = L // 2
    rows = []
    for batch in batches:
        ids, mask = prompts(model, batch, args.prompt)
        call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens)
        configure(model)
        ours_full = model.generate(**call)
        if not torch.equal(ours_full, hf_generate(model, **call)):
            raise RuntimeError("our full model and HF generate disagree: the comparison would be of unequal work")
        configure(model, static_exit_layer=k)
        ours_static = model.generate(**call)
        with cut_to(model, k):
            if not torch.equal(ours_static, hf_generate(model, **call)):
                raise RuntimeError("our static exit and HF's cut model disagree")

        def ours(**flags):
            def run():
                configure(model, **flags)
                model.generate(**call)
                return {"prefill": model.exit_stats()["time_prefill"]}
            return run

        def hf(layers=None, new_tokens=args.new_tokens):
            def run():
                configure(model)
                with cut_to(model, layers or L):
                    hf_generate(model, **dict(call, max_new_tokens=new_tokens))
            return run

        variants = {"hf_full": hf(), "ours_full": ours(), "hf_cut": hf(k), "ours_static": ours(static_exit_layer=k),
                    "hf_prefill_full": hf(new_tokens=1), "hf_prefill_cut": hf(k, new_tokens=1)}
        results = run_side_by_side(variants, args.rounds, model.device)
        t = {name: median(r["seconds"]) for name, r in results.items()}
        ours_prefill = median(results["ours_full"]["prefill"])
        hf_speedup = t["hf_full"] / t["hf_cut"]
        our_speedup = t["ours_full"] / t["ours_static"]
        # decoding alone: the time after the prefill (HF's: a call of one new token)
        hf_decode_speedup = (t["hf_full"] - t["hf_prefill_full"]) / (t["hf_cut"] - t["hf_prefill_cut"])
        our_decode_speedup = (t["ours_full"] - ours_prefill) / (t["ours_static"] - median(results["ours_static"]["prefill"]))
        rows.append(dict(shape=shape, batch=batch, hf_full_s=t["hf_full"], ours_full_s=t["ours_full"],
                         ours_over_hf=t["ours_full"] / t["hf_full"], hf_cut_s=t["hf_cut"], ours_static_s=t["ours_static"],
                         hf_speedup=hf_speedup, our_speedup=our_speedup, speedup_fraction=our_speedup / hf_speedup,
                         decode_speedup_fraction=our_decode_speedup / hf_decode_speedup,
                         hf_prefill_s=t["hf_prefill_full"], ours_prefill_s=ours_prefill))
    return rows


# ----- self-speculation ---------------------------------------------------------------------------
def scale_deep_layers(model, k: int, factor: float):
    """Scale the output projections of blocks k+1..L: the smaller, the closer layer k is to the top."""
    with torch.no_grad():
        for layer in model.model.layers[k:]:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)


def bench_speculation(shape, args):
    rows = []
    for level, factor in (("~80%", args.scale_80), ("~50%", args.scale_50)):
        model = build(shape)
        L = model.config.num_hidden_layers
        k = args.shallow_layer or L // 4
        scale_deep_layers(model, k, factor)
        ids, mask = prompts(model, 1, args.prompt)
        call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens)
        spec = dict(use_shallow_deep=True, shallow_exit_layer=k, shallow2deep_conf_type="softmax",
                    shallow2deep_conf_threshold=0.0, use_self_speculation=True, max_draft_tokens=args.draft)
        configure(model)
        full = model.generate(**call)
        configure(model, **spec)
        mine = model.generate(**call)
        acceptance = model.exit_stats()["acceptance_rate"]
        configure(model)
        theirs = hf_generate(model, assistant_early_exit=k, **call)
        if not (torch.equal(full, mine) and torch.equal(full, theirs)):
            raise RuntimeError("self-speculation, HF's assisted generation and the full model disagree")

        def ours(**flags):
            def run():
                configure(model, **flags)
                model.generate(**call)
            return run

        def hf(**kwargs):
            def run():
                configure(model)
                hf_generate(model, **call, **kwargs)
            return run

        variants = {"ours_full": ours(), "ours_spec": ours(**spec), "hf_full": hf(), "hf_assisted": hf(assistant_early_exit=k)}
        results = run_side_by_side(variants, args.rounds, model.device)
        t = {name: median(r["seconds"]) for name, r in results.items()}
        rows.append(dict(shape=shape, level=level, deep_scale=factor, shallow_layer=k, draft=args.draft,
                         acceptance=acceptance, ours_spec_over_hf_assisted=t["hf_assisted"] / t["ours_spec"],
                         ours_spec_over_ours_full=t["ours_full"] / t["ours_spec"],
                         hf_assisted_over_hf_full=t["hf_full"] / t["hf_assisted"],
                         ours_full_over_hf_full=t["hf_full"] / t["ours_full"]))
    return rows


# ----- confidence checks --------------------------------------------------------------------------
def bench_checks(shape, args):
    model = build(shape)
    L = model.config.num_hidden_layers
    ids, mask = prompts(model, 1, args.prompt)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens)
    checked = dict(use_early_exit=True, exit_conf_type="softmax", exit_conf_threshold=1.0)
    # the start layer's check (the full head, its top-k and the retained rows): one check per token
    reductions = {"full head": {}, "decaying": dict(type_vocab_reduct="decaying"),
                  "decaying, start layer alone": dict(type_vocab_reduct="decaying", exit_min_layer=L - 1)}
    checks_per_token = {"full head": L - 1, "decaying": L - 1, "decaying, start layer alone": 1}
    flops = {}
    for name, flags in reductions.items():
        configure(model, count_flops=True, **checked, **flags)
        model.generate(**call)
        flops[name] = model.exit_stats()["flops_confidence"]

    def ours(**flags):
        def run():
            configure(model, **flags)
            model.generate(**call)
            stats = model.exit_stats()
            return {key: stats[key] for key in ("time_blocks", "time_confidence", "tokens")}
        return run

    variants = {name: ours(**checked, **flags) for name, flags in reductions.items()}
    results = run_side_by_side(variants, args.rounds, model.device)
    rows = []
    for name in reductions:
        r = results[name]
        tokens = r["tokens"][0]
        block = median(r["time_blocks"]) / ((tokens - 1) * L)  # the first token's blocks ran in the prefill
        check = median(r["time_confidence"]) / (tokens * checks_per_token[name])
        rows.append(dict(shape=shape, check=name, check_over_block=check / block, block_ms=1e3 * block,
                         check_ms=1e3 * check, flops_confidence=flops[name],
                         flops_over_full_head=flops[name] / flops["full head"] * (L - 1) / checks_per_token[name]))
    # the reduced checks after the start layer: all decaying checks less the start layer's
    start, every = rows[2], rows[1]
    later = ((L - 1) * every["check_over_block"] - start["check_over_block"]) / (L - 2)
    rows.append(dict(shape=shape, check="decaying, later layers (derived)", check_over_block=later,
                     block_ms=every["block_ms"], check_ms=later * every["block_ms"], flops_confidence=None,
                     flops_over_full_head=((L - 1) * every["flops_over_full_head"] - start["flops_over_full_head"]) / (L - 2)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-small,llama-1b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", default="engine,speculation,checks")
    parser.add_argument("--speculation-shape", default="llama-small")
    parser.add_argument("--checks-shape", default="llama-1b")
    parser.add_argument("--shallow-layer", dest="shallow_layer", type=int, default=None, help="default L/4")
    parser.add_argument("--draft", type=int, default=4, help="max_draft_tokens of our self-speculation")
    parser.add_argument("--scale-80", dest="scale_80", type=float, default=0.02)
    parser.add_argument("--scale-50", dest="scale_50", type=float, default=0.04)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    unknown = set(parts) - {"engine", "speculation", "checks"}
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}")
    payload = {"args": vars(args)}
    if "engine" in parts:
        rows = [row for shape in args.shapes.split(",")
                for row in bench_engine(shape, [int(b) for b in args.batches.split(",")], args)]
        payload["engine"] = rows
        print_table(["shape", "batch", "ours/HF time", "HF static speed-up", "ours", "fraction", "decode-only fraction"],
                    [(r["shape"], r["batch"], f"{r['ours_over_hf']:.2f}", f"{r['hf_speedup']:.2f}",
                      f"{r['our_speedup']:.2f}", f"{r['speedup_fraction']:.2f}", f"{r['decode_speedup_fraction']:.2f}")
                     for r in rows])
    if "speculation" in parts:
        rows = bench_speculation(args.speculation_shape, args)
        payload["speculation"] = rows
        print_table(["shape", "level", "acceptance", "ours/HF assisted (tok/s)", "ours spec/ours full",
                     "HF assisted/HF full", "ours full/HF full"],
                    [(r["shape"], r["level"], f"{r['acceptance']:.2f}", f"{r['ours_spec_over_hf_assisted']:.2f}",
                      f"{r['ours_spec_over_ours_full']:.2f}", f"{r['hf_assisted_over_hf_full']:.2f}",
                      f"{r['ours_full_over_hf_full']:.2f}") for r in rows])
    if "checks" in parts:
        rows = bench_checks(args.checks_shape, args)
        payload["checks"] = rows
        print_table(["shape", "check", "check / block (time)", "FLOPs / full-head check's"],
                    [(r["shape"], r["check"], f"{r['check_over_block']:.3f}", f"{r['flops_over_full_head']:.3f}")
                     for r in rows])
    print("saved", save_results("bench_causal", payload))


if __name__ == "__main__":
    main()
