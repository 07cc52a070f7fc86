"""Tokenising SFT rows in one process against one per core (data.tokenize, datasets.map(num_proc)), to
place data.PARALLEL_ROWS where the processes start paying. Writes benchmarks/results/tokenize_cpu.json.

    python benchmarks/tokenize_cpu.py [--rows 1000 4000 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 4000, 20000])
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from scripts.testbed import make_tiny_fixtures
    from training.data import PARALLEL_ROWS, tokenize

    root = make_tiny_fixtures(Path(tempfile.mkdtemp()))
    tok = AutoTokenizer.from_pretrained(str(root / "models" / "tiny-gemma3"))
    workers = os.cpu_count() or 1
    results = []
    for n in args.rows:
        rows = [[{"role": "system", "content": "Answer in one sentence."},
                 {"role": "user", "content": f"What does animal number {i} say when it is hungry?"},
                 {"role": "assistant", "content": "It says moo, loudly, twice. " * (1 + i % 4)}] for i in range(n)]
        timings = {}
        for w in (1, workers):
            t = time.perf_counter()
            tokenize(rows, tok, 256, True, workers=w)
            timings[w] = round(time.perf_counter() - t, 2)
        results.append({"rows": n, "one_process_s": timings[1], f"{workers}_processes_s": timings[workers]})
        print(results[-1])
    out = ROOT / "benchmarks" / "results" / "tokenize_cpu.json"
    out.write_text(json.dumps({"date": date.today().isoformat(), "cpu_count": workers, "parallel_rows": PARALLEL_ROWS,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
