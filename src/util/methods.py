"""The one table of decoding methods: what scripts/common.sh (METHOD=...), src/demo.py,
src/run_sweep.py and the tests read.

Each method maps its parameters (threshold, minimum layer, static and shallow layers) to the
flags of `AdditionalArguments`, as a dict; `to_argv` turns that into command-line arguments.
Run as a script, it prints one argument per line for the shell scripts:

    python src/util/methods.py softmax --threshold 0.9 --min_layer 4

This module imports nothing heavy, so the scripts pay no torch start-up for it.
"""

import argparse
import sys
from typing import Callable, Dict, List, Optional

# vocabulary reductions of the early-exit methods and the sweep ("+rerank": progressive pruning,
# the retained set re-ranked by each layer's own scores)
REDUCTIONS: Dict[str, dict] = {
    "none": {},
    "fixed": {"type_vocab_reduct": "fixed"},
    "decaying": {"type_vocab_reduct": "decaying"},
    "adaptive": {"type_vocab_reduct": "adaptive"},
    "decaying+rerank": {"type_vocab_reduct": "decaying", "vocab_rerank": True},
    "adaptive+rerank": {"type_vocab_reduct": "adaptive", "vocab_rerank": True},
}
DEFAULTS = {"threshold": 0.9, "min_layer": None, "static_layer": 12, "shallow_layer": 6}


def early_exit(conf_type: str, threshold: float, min_layer: Optional[int], reduction: str = "none",
               **extra) -> dict:
    """CALM-style early exit with one confidence measure (min_layer None: checks from layer 1)."""
    flags = {"use_early_exit": True, "exit_conf_type": conf_type, "exit_conf_threshold": threshold}
    if min_layer is not None:
        flags["exit_min_layer"] = min_layer
    return {**flags, **extra, **REDUCTIONS[reduction]}


def shallow_deep(shallow_layer: int, threshold: float, **extra) -> dict:
    return {"use_shallow_deep": True, "shallow_exit_layer": shallow_layer, "shallow2deep_conf_type": "softmax",
            "shallow2deep_conf_threshold": threshold, **extra}


# METHOD name -> flags from the parameters (p: threshold, min_layer, static_layer, shallow_layer)
METHODS: Dict[str, Callable[[dict], dict]] = {
    "full": lambda p: {},                                             # all decoder blocks
    "static": lambda p: {"static_exit_layer": p["static_layer"]},     # static exit
    "softmax": lambda p: early_exit("softmax", p["threshold"], p["min_layer"]),
    "meta": lambda p: early_exit("meta", p["threshold"], p["min_layer"]),  # needs a trained meta head
    "state": lambda p: early_exit("state", p["threshold"], p["min_layer"]),
    "decay": lambda p: early_exit("softmax", p["threshold"], None, exit_position_temp=4.0),  # position-decaying
    "vocab_fixed": lambda p: early_exit("softmax", p["threshold"], p["min_layer"], "fixed"),
    "vocab_decaying": lambda p: early_exit("softmax", p["threshold"], p["min_layer"], "decaying"),
    "vocab_adaptive": lambda p: early_exit("softmax", p["threshold"], p["min_layer"], "adaptive"),
    "vocab_decaying_rerank": lambda p: early_exit("softmax", p["threshold"], p["min_layer"], "decaying+rerank"),
    "contrastive": lambda p: early_exit("contrastive_decoding", p["threshold"], p["min_layer"]),
    "reweight": lambda p: early_exit("reweight_contrastive_decoding", p["threshold"], p["min_layer"]),
    "jsd": lambda p: early_exit("JSD_contrastive_confidence", p["threshold"], p["min_layer"]),
    "shallow_deep": lambda p: shallow_deep(p["shallow_layer"], p["threshold"]),  # FREE
    "shallow_deep_adaptive": lambda p: shallow_deep(p["shallow_layer"], p["threshold"], use_adapt_threshold=True),
    # lossless: shallow drafts verified by the deep layers, output identical to the full model
    "self_speculation": lambda p: shallow_deep(p["shallow_layer"], p["threshold"], use_self_speculation=True),
}


def method_flags(name: str, **parameters) -> dict:
    """The flags of method `name`; parameters not given take DEFAULTS."""
    if name not in METHODS:
        raise ValueError(f"unknown METHOD={name} ({', '.join(METHODS)})")
    unknown = set(parameters) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown method parameters: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULTS)})")
    return METHODS[name]({**DEFAULTS, **parameters})


def to_argv(flags: dict) -> List[str]:
    """`--flag value` pairs, as the task scripts parse them."""
    argv = []
    for name, value in flags.items():
        argv += [f"--{name}", str(value)]
    return argv


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Print a decoding method's arguments, one per line.")
    parser.add_argument("method")
    parser.add_argument("--threshold", type=float, default=DEFAULTS["threshold"])
    parser.add_argument("--min_layer", type=int, default=DEFAULTS["min_layer"])
    parser.add_argument("--static_layer", type=int, default=DEFAULTS["static_layer"])
    parser.add_argument("--shallow_layer", type=int, default=DEFAULTS["shallow_layer"])
    args = vars(parser.parse_args(argv))
    name = args.pop("method")
    try:
        flags = method_flags(name, **args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for part in to_argv(flags):
        print(part)


if __name__ == "__main__":
    main()
