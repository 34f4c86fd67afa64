"""Shared pieces of the benchmarks: model shapes, timing side by side, reporting.

Every benchmark builds random-weight models of real T5 shapes in memory (no download), runs
the variants it compares in interleaved rounds (this machine is noisy, so variants see the same
conditions), and reports medians and ratios. Results also go to a JSON file under bench/results.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from transformers import T5Config  # noqa: E402

from models.deploying_t5 import DeployT5ForConditionalGeneration, EarlyExitGenerationMixin  # noqa: E402
from util.additional_args import AdditionalArguments, update_autoconfig  # noqa: E402

SHAPES = {
    # d_model, d_kv, d_ff, heads, layers and vocabulary of the public T5 checkpoints
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_heads=16, num_layers=24, vocab_size=32128),
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6, vocab_size=32128),
}


def build_model(shape: str, seed: int = 0, dtype=torch.float32, device="cpu", **overrides):
    """A random-weight T5 of the named shape (config fields in `overrides` replaced) that never
    emits EOS, so every run has equal length."""
    settings = {**SHAPES[shape], "dropout_rate": 0.0, "decoder_start_token_id": 0, "eos_token_id": None, **overrides}
    config = T5Config(**settings)
    torch.manual_seed(seed)
    model = DeployT5ForConditionalGeneration(config).eval().to(dtype=dtype, device=device)
    model.generation_config.eos_token_id = None
    return model


def hf_generate(model, **kwargs):
    """HF's own greedy generate of the model's class (the one after our early-exit mixin)."""
    return super(EarlyExitGenerationMixin, model).generate(do_sample=False, num_beams=1, **kwargs)


def hf_variant(model, inputs, steps):
    """A side-by-side variant: HF's generate over each input."""
    def run():
        configure(model)
        for input_ids in inputs:
            hf_generate(model, input_ids=input_ids, max_new_tokens=steps)
        return {"tokens": steps * len(inputs)}

    return run


def configure(model, **flags):
    update_autoconfig(model.config, AdditionalArguments(**flags))


def sample_inputs(model, count: int, length: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, model.config.vocab_size, (1, length), generator=generator).to(model.device)
            for _ in range(count)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def run_side_by_side(variants: dict, rounds: int, device):
    """variants: name -> callable returning a dict of extra measurements. Interleaved rounds.
    Returns name -> {"seconds": [per round], plus lists of each extra measurement}."""
    results = {name: {"seconds": []} for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            seconds, extra = timed(fn, device)
            results[name]["seconds"].append(seconds)
            for key, value in (extra or {}).items():
                results[name].setdefault(key, []).append(value)
    return results


def median(values):
    return statistics.median(values)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def projection_rule(rule):
    """A variant's run with models.projection's choice replaced by `rule(weight, rows)`."""
    from models import projection

    def wrap(run):
        def wrapped():
            saved = projection.uses_transposed
            projection.uses_transposed = rule
            try:
                return run()
            finally:
                projection.uses_transposed = saved
        return wrapped
    return wrap


def fixed_transposed(weight, rows):
    """The rule before measurement: every CPU weight of SMALL_WEIGHTS or more as W x^T."""
    from models import projection
    return weight.device.type == "cpu" and weight.numel() >= projection.SMALL_WEIGHTS


def save_results(name: str, payload: dict) -> Path:
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = dict(payload, torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                   cpu=cpu_name())
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
