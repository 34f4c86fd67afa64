"""Offline demo: train a tiny T5 on a copy task, then decode it under each exit policy.

    make demo          (or: .venv/bin/python src/demo.py)

Prints one comparison table (accuracy against the full model, block_avg, tokens/s) and saves it
to outputs/demo/demo_results.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.deploying_t5 import DeployT5ForConditionalGeneration  # noqa: E402
from util.additional_args import AdditionalArguments, update_autoconfig  # noqa: E402
from util.copy_task import copy_batch, copy_config, train_copy_model  # noqa: E402

POLICIES = {
    "full model": {},
    "static exit at L/2": {"static_exit_layer": 2},
    "early exit, softmax 0.9": {"use_early_exit": True, "exit_conf_type": "softmax", "exit_conf_threshold": 0.9},
    "early exit, softmax 0.5": {"use_early_exit": True, "exit_conf_type": "softmax", "exit_conf_threshold": 0.5},
    "early exit, state 0.9": {"use_early_exit": True, "exit_conf_type": "state", "exit_conf_threshold": 0.9},
}


def evaluate(model, sources, targets, flags):
    update_autoconfig(model.config, AdditionalArguments(**flags))
    correct = tokens = blocks = 0
    elapsed = 0.0
    for source, target in zip(sources, targets):
        start = time.perf_counter()
        out = model.generate(input_ids=source, max_new_tokens=target.shape[1] + 2)
        elapsed += time.perf_counter() - start
        stats = model.exit_stats()
        correct += int(out[0, 1:].tolist() == target[0].tolist())
        tokens += stats["tokens"]
        blocks += stats["block_avg"] * stats["tokens"]
    return {"exact_copies": correct / len(sources), "block_avg": blocks / tokens, "tokens_per_s": tokens / elapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the copy model")
    parser.add_argument("--samples", type=int, default=50, help="evaluation samples")
    parser.add_argument("--output_dir", default="outputs/demo")
    args = parser.parse_args()

    print(f"Training a tiny T5 (4 decoder blocks) on a copy task for {args.steps} steps ...")
    trained = train_copy_model(copy_config(), steps=args.steps)
    model = DeployT5ForConditionalGeneration(trained.config).eval()
    model.load_state_dict(trained.state_dict())

    generator = torch.Generator().manual_seed(1234)
    pairs = [copy_batch(generator, 1, 8, model.config.vocab_size) for _ in range(args.samples)]
    sources = [source for source, _ in pairs]
    targets = [labels for _, labels in pairs]
    results = {name: evaluate(model, sources, targets, flags) for name, flags in tqdm(POLICIES.items(), desc="policies")}

    print(f"\n{'policy':28} {'exact copies':>12} {'block_avg':>10} {'tokens/s':>10}")
    for name, row in results.items():
        print(f"{name:28} {row['exact_copies']:12.2f} {row['block_avg']:10.2f} {row['tokens_per_s']:10.1f}")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out_dir / 'demo_results.json'}")


if __name__ == "__main__":
    main()
