"""Evaluation and sweeps spread over the processes of `torchrun` / `accelerate launch`.

Evaluation: each process decodes one contiguous shard of the evaluation set (the samples split
evenly, batched inside each shard), on its own device; the texts, lengths, exit layers and every
generate call's exit statistics (with its rows' sample indices) are gathered to all processes
and put in dataset order. Process 0 alone computes the task metrics, once, on the gathered
predictions (they equal one process's), and alone writes.

    texts, lengths, exits, per_process = generate_in_shards(generate, sources, batch_size, stats)

Sweep: `run_cells` gives each process whole cells (round robin over the unfinished ones, in grid
order) and collects every cell's outcome on process 0, which writes the report. A cell runs the
pipeline as this process's own job (`alone=True`, passed down by the caller): no sharding inside it.

The process group is the one HF's TrainingArguments opens (gloo with `--use_cpu True`, NCCL on
GPUs) for evaluation, and a gloo group this module opens for the sweep's bookkeeping.
"""

import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch.distributed as dist
from tqdm import tqdm

# `alone` below: this pipeline run belongs to this process only, whatever the launcher started: it is
# process 0 of 1, decodes every sample and writes its own output_dir (a sweep cell under torchrun).


def launched_processes(alone: bool = False) -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 when alone or not launched)."""
    return 1 if alone else int(os.environ.get("WORLD_SIZE", "1"))


def process_index(training_args, alone: bool = False) -> int:
    return 0 if alone else training_args.process_index


def num_processes(training_args, alone: bool = False) -> int:
    """Processes that share an evaluation: those of the open process group."""
    if alone or not (dist.is_available() and dist.is_initialized()):
        return 1
    return training_args.world_size


def barrier(training_args, alone: bool = False) -> None:
    if num_processes(training_args, alone) > 1:
        dist.barrier()


def close() -> None:
    """Close the process group, if one is open, once this process has no more to exchange: a
    process that exits with a gloo group still open can abort ("terminate called without an
    active exception", seen in about 1 exit in 6 here) and fail the whole launch."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----- checks, before any work --------------------------------------------------------------------
def check_arguments(processes: int, training_args, additional_args) -> None:
    evaluating = training_args.do_eval or training_args.do_predict
    if processes > 1 and evaluating and additional_args.use_adapt_threshold:
        raise ValueError(f"--use_adapt_threshold estimates its threshold from the samples decoded before, in "
                         f"order: it cannot be split over {processes} processes. Launch one process.")


def check_split_sizes(processes: int, sizes: Dict[str, int]) -> None:
    """Every process needs at least one sample of every evaluated split."""
    for split, size in sizes.items():
        if processes > size:
            raise ValueError(f"launched as {processes} processes, but the {split} split has only {size} sample(s): "
                             f"launch at most {size} process(es) (torchrun --nproc_per_node, accelerate launch "
                             "--num_processes) or evaluate more samples.")


# ----- evaluation -------------------------------------------------------------------------------------
def shard_bounds(num_items: int, rank: int, size: int) -> Tuple[int, int]:
    """[start, stop) of process `rank`'s contiguous shard: the samples split evenly, the first
    processes one more when they do not divide (at least one each where size <= num_items, which
    check_split_sizes ensures)."""
    per, extra = divmod(num_items, size)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


class _Calls(list):
    """Stands in for ExitStatsTotals on a shard: keeps every call's exit_stats and its rows' sample
    indices within the shard, to be summed once gathered."""

    def add(self, stats: dict, indices: List[int]) -> None:
        self.append((stats, indices))


def generate_in_shards(generate: Callable, sources: List[str], batch_size: int, stats, processes: int,
                       rank: int, show_progress: bool = True, **kwargs):
    """(texts, lengths, exits, per_process) for every source, in order, decoded by `processes`
    processes together; per_process holds each process's samples and decoding seconds ({} alone).

    generate(sources, batch_size=, stats=, show_progress=, desc=, position=, **kwargs) is
    runner.generate_predictions with its model and tokenizer bound; `stats` (ExitStatsTotals or
    None) receives every call's statistics with its rows' sample indices in `sources`.
    """
    if processes == 1:
        texts, lengths, exits = generate(sources, batch_size=batch_size, stats=stats,
                                         show_progress=show_progress, **kwargs)
        return texts, lengths, exits, {}
    start, stop = shard_bounds(len(sources), rank, processes)
    calls = _Calls() if stats is not None else None
    desc = f"Generating, process {rank} of {processes}"
    if rank == 0:
        desc += f" ({len(sources)} samples in all)"
    began = time.perf_counter()
    texts, lengths, exits = generate(sources[start:stop], batch_size=batch_size, stats=calls,
                                     show_progress=show_progress, desc=desc, position=rank, **kwargs)
    mine = {"texts": texts, "lengths": lengths, "exits": exits, "calls": calls,
            "seconds": time.perf_counter() - began}
    shards = [None] * processes
    dist.all_gather_object(shards, mine)  # in rank order = dataset order

    texts = [t for shard in shards for t in shard["texts"]]
    lengths = [n for shard in shards for n in shard["lengths"]]
    exits = [e for shard in shards for e in shard["exits"]] if stats is not None else None
    if stats is not None:
        for r, shard in enumerate(shards):
            offset = shard_bounds(len(sources), r, processes)[0]
            for call, indices in shard["calls"]:
                stats.add(call, [offset + i for i in indices])
    per_process = {"processes": processes,
                   "samples_per_process": [len(shard["texts"]) for shard in shards],
                   "runtime_per_process": [shard["seconds"] for shard in shards]}
    if stats is not None:
        per_process["time_total_per_process"] = [sum(c.get("time_total", 0.0) for c, _ in shard["calls"])
                                                 for shard in shards]
    return texts, lengths, exits, per_process


# ----- sweep ------------------------------------------------------------------------------------------
def sweep_world(num_cells: int) -> Tuple[int, int, bool]:
    """(rank, processes, opened) of a sweep; opens a gloo group (opened True) when launched as
    several processes and none is open. More processes than cells is an error, raised by every
    process before any work."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > num_cells:
        raise ValueError(f"launched as {processes} processes, but the sweep has only {num_cells} cells: launch at "
                         f"most {num_cells} processes (torchrun --nproc_per_node, accelerate launch --num_processes).")
    if processes == 1:
        return 0, 1, False
    opened = not dist.is_initialized()
    if opened:
        dist.init_process_group(backend="gloo")  # bookkeeping only: a few small objects
    return dist.get_rank(), dist.get_world_size(), opened


def run_cells(names: List[str], run_one: Callable[[str, bool], object], finished: Callable[[str], bool]
              ) -> Optional[Dict[str, object]]:
    """{name: run_one(name, alone)} in the order of `names`, on process 0 (None on the others).

    Alone, every cell runs here in order. Launched as several processes, process 0 lists the
    unfinished cells, each process runs every N-th of them (as its own job: alone=True), and
    process 0 collects their outcomes; a finished cell is run_one'd by process 0 alone (it reads
    its results). An exception in any cell stops that process (and the launcher stops the others).
    """
    rank, processes, opened = sweep_world(len(names))
    if processes == 1:
        return {name: run_one(name, False) for name in tqdm(names, desc="sweep cells")}
    todo = [[name for name in names if not finished(name)] if rank == 0 else None]
    dist.broadcast_object_list(todo, src=0)
    mine = todo[0][rank::processes]
    desc = f"sweep cells, process {rank} of {processes}"
    if rank == 0:
        desc += f" ({len(todo[0])} of {len(names)} cells to run)"
    outcomes = {name: run_one(name, True) for name in tqdm(mine, desc=desc, position=rank)}
    gathered = [None] * processes if rank == 0 else None
    dist.gather_object(outcomes, gathered, dst=0)  # also the barrier before the report
    if opened:
        close()
    if rank != 0:
        return None
    done = {name: outcome for part in gathered for name, outcome in part.items()}
    return {name: done[name] if name in done else run_one(name, True) for name in names}
