"""Runs several task pipelines one after the other in this process: launched by the tests under
torchrun, so that one launch (one start-up of torch per process) covers every task.

    torchrun --nproc_per_node 2 tests/distributed_job.py jobs.json    # [[task, argv], ...]
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from tasks import distributed, runner  # noqa: E402
from tasks.adapters import QuestionAnswering, Summarization, Translation  # noqa: E402

TASKS = {"qa": QuestionAnswering, "summarization": Summarization, "translation": Translation}

def logged(compute_metrics, path):
    """compute_metrics that appends this process's rank to `path` at every call."""
    def wrapped(self, *args, **kwargs):
        with open(path, "a") as handle:
            handle.write(os.environ.get("RANK", "0") + "\n")
        return compute_metrics(self, *args, **kwargs)
    return wrapped


if __name__ == "__main__":
    if os.environ.get("METRICS_LOG"):  # the test counts who computes the metrics
        for task_class in TASKS.values():
            task_class.compute_metrics = logged(task_class.compute_metrics, os.environ["METRICS_LOG"])
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    for task, argv in jobs:
        runner.run(TASKS[task](), argv)
    distributed.close()
