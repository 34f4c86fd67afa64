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

if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    for task, argv in jobs:
        runner.run(TASKS[task](), argv)
    distributed.close()
