"""Test harness only (on PYTHONPATH in the suite's subprocesses, never in the image): a `python main.py` the
tests start, or one a job starts (a rank, the GGUF converter, the GPU benchmark's shapes), runs in a child
forked from a process that has already imported torch, transformers, PEFT and TRL. See prefork.py."""

import os
import sys

SCRIPTS = ("main.py", "convert_hf_to_gguf.py", "gpu_bench.py", "fsdp_worker.py", "consumer_load.py",
           "consumer_vision.py")

# PREFORK_SKIP: this process starts from scratch (a launcher whose ranks a test finds among its children);
# the processes it starts may fork.
if (os.environ.pop("PREFORK_SKIP", None) is None and os.environ.get("PREFORK_DIR") and sys.argv
        and os.path.basename(sys.argv[0]) in SCRIPTS):
    import prefork

    prefork.proxy()  # returns only where the script is to run here, from scratch
