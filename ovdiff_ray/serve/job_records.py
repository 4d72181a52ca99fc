"""Live-bank job records kept beside the bank, so they outlive the job manager's replica.

`<bank>/jobs/<job id>.json` (the bank's own storage: a local folder or S3) holds what `GET /v1/jobs/ID` answers
plus what a new manager needs to finish the job: the classes to build (`name`, `kind`, `prompt`). It is written
when the job is accepted, when it starts and when it ends. A manager that starts (a replica restarted after its
process or node died, or the application redeployed) reads the records of the banks it serves: a job that had not
ended is submitted again under its own id (its classes already committed come back `present`, the others are
built; shards are content-addressed, so a class half-built before the death is rebuilt to the same shard), and
`GET /v1/jobs/ID` of a job no longer in memory answers from its record.

The record is JSON, at most `MAX_RECORD_BYTES`; the job id is 16 hex characters (checked before any read).
"""
from __future__ import annotations

import json
import logging
import re

log = logging.getLogger("ovdiff.serve")
PREFIX = "jobs/"
MAX_RECORD_BYTES = 1 << 20
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
UNFINISHED = ("queued", "running")


def key(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise ValueError(f"not a job id: {job_id[:40]!r}")
    return f"{PREFIX}{job_id}.json"


def save(loc, public: dict, to_build: list[dict]) -> None:
    """Write the record of a job (`public`: `Job.public()`; `to_build`: its classes as submitted)."""
    rec = {**public, "resume": {"classes": to_build}}
    loc.write_bytes(key(public["job"]), json.dumps(rec, sort_keys=True).encode())


def load(loc, job_id: str) -> dict | None:
    """A job's record, or None when there is none."""
    k = key(job_id)
    if not loc.exists(k):
        return None
    return json.loads(loc.read_bytes(k, MAX_RECORD_BYTES))


def public(rec: dict) -> dict:
    """What `GET /v1/jobs/ID` shows of a record."""
    return {k: v for k, v in rec.items() if k != "resume"}


def unfinished(loc) -> list[dict]:
    """The records of jobs that had not ended (queued or running), oldest first."""
    out = []
    for k in loc.list(PREFIX):
        name = k.rsplit("/", 1)[-1]
        if not name.endswith(".json") or not JOB_ID.match(name[:-5]):
            continue
        try:
            rec = json.loads(loc.read_bytes(f"{PREFIX}{name}", MAX_RECORD_BYTES))
        except (OSError, ValueError) as e:
            log.warning("job record %s unreadable: %s", name, e)
            continue
        if rec.get("state") in UNFINISHED:
            out.append(rec)
    return sorted(out, key=lambda r: r.get("created", 0))
