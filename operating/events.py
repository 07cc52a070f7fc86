"""`gemma-job events JOB_ID [--follow] [--json]`: a job's events (job_manager.JobTracker.event), in order, one line
each: when, which attempt, what, and its details. --follow goes on until an event ends the job (completed, failed,
cancelled), reading the events every --interval seconds (and waiting up to --wait-start for a job's first). Exit 0 completed or cancelled, 1 failed or no events,
2 when --timeout passes first."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from job_manager import ENDS


def line(event: dict[str, Any]) -> str:
    """'2026-12-08T00:31:02 [0] checkpoint  step=8 uri=gs://... loss=2.1': one event, for people."""
    details = " ".join(f"{k}={json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
                       for k, v in event.items() if k not in ("id", "kind", "at", "attempt") and v is not None)
    return f"{str(event.get('at', ''))[:19]} [{event.get('attempt', 0)}] {event['kind']:<12} {details}".rstrip()


def show(store, args, clock=time.monotonic, sleep=time.sleep) -> int:
    started, last, ended = clock(), "", None
    while True:
        for event in store.events(args.job_id, after=last):
            print(json.dumps(event, default=str) if args.json else line(event), flush=True)
            last = event["id"]
            if event["kind"] in ENDS:
                ended = event["kind"]
        # a job just started writes its first event as it opens its document: --follow waits that long for it
        if ended or not args.follow or (not last and clock() - started >= args.wait_start):
            break
        if args.timeout and clock() - started > args.timeout:
            print(f"events: job {args.job_id} has not ended after {args.timeout:.0f}s", file=sys.stderr)
            return 2
        sleep(args.interval)
    if not last:
        print(f"events: no events of job {args.job_id}", file=sys.stderr)
        return 1
    return 1 if ended == "failed" else 0
