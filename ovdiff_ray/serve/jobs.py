"""Jobs that add classes to a served bank while it is served: `POST /v1/classes` -> a job -> a new bank version.

A job builds its classes by `build_bank`'s code path: each class goes to a `ClassWorker` (the same class, its
retries of a class that raises, its content-addressed shard), held here as a Ray actor so its models are loaded
once and kept warm (`num_gpus` per worker configurable, 0 on CPU machines); the job then commits the built
classes with `BuildState.commit`, the conditional write that makes a class land in the bank exactly once, even when
a `build_bank` run or another job commits the same bank at the same time.

    ingress  --submit(uri, classes)-->  JobManager (one Serve replica)  --build_one-->  ClassWorker actors
             <--{job, pending, present}                                 <--entry / error
    segmenter replicas  --wait_commit(seen)-->  (returns when a job committed: they reload at once)

Two jobs asking for the same class share one build (`shared_with` names the job that started it). A worker that
dies mid-class (its process or node lost) is replaced and the class tried again, up to `worker_retries` times; the
job lists every such event. Limits: classes per request and classes pending (queued or building) in all.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

from ray import serve

from .. import logs, metrics
from . import job_records

log = logging.getLogger("ovdiff.serve")
JOBS = "OVDiffBankJobs"
JOB_ID_CHARS = 16
WORKER_PREFIX = "ovdiff-class-worker-"  # named actors (in the app's namespace), so operators can find them


@dataclass
class BuildSettings:
    """How jobs build (the `build:` block of the app config)."""

    workers: int = 1  # ClassWorker actors kept per bank
    gpus_per_worker: float = 0.0  # 0 on CPU machines
    cpus_per_worker: float = 1.0
    retries: int = 2  # ClassWorker's own retries of a class that raises (as build_bank --retries)
    worker_retries: int = 2  # a class whose worker died, tried again on a new worker
    max_classes_per_request: int = 16
    max_pending_classes: int = 64  # queued or building, all jobs together
    idle_s: float = 600.0  # workers idle this long are stopped (their GPU freed)
    max_jobs_kept: int = 1000  # finished jobs remembered for GET /v1/jobs/ID

    @classmethod
    def from_dict(cls, d: dict | None) -> "BuildSettings":
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown build setting(s) {', '.join(unknown)} (known: "
                             f"{', '.join(f.name for f in fields(cls))})")
        s = cls(**d)
        if s.workers < 1 or s.max_classes_per_request < 1 or s.max_pending_classes < 1 or s.gpus_per_worker < 0:
            raise ValueError("build: workers, max_classes_per_request, max_pending_classes must be >= 1 and "
                             "gpus_per_worker >= 0")
        return s

    def to_dict(self) -> dict:
        return asdict(self)


class Busy(Exception):
    """Too much pending work: 429 with Retry-After."""


@dataclass
class Task:
    """One class being built for one bank; shared by every job that asks for it while it is in flight."""

    name: str
    kind: str
    prompt: str
    class_id: int
    job: str  # the job that started it
    state: str = "queued"  # queued | running | built | failed
    entry: dict | None = None
    error: str = ""
    attempts: int = 0  # attempts of the class (ClassWorker's, summed over workers)
    workers_lost: int = 0
    events: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    seconds: float = 0.0


@dataclass
class Job:
    id: str
    uri: str
    bank_id: str
    base_version: int
    classes: list[dict]  # per class: name, kind, outcome (present | pending | built | failed), ...
    tasks: dict[str, Task] = field(default_factory=dict)  # folded name -> task
    state: str = "queued"  # queued | running | done | failed
    created: float = field(default_factory=time.time)
    finished: float | None = None
    version: int | None = None  # the version that holds the job's classes
    committed: bool = False  # this job's commit made that version
    error: str = ""
    to_build: list[dict] = field(default_factory=list)  # the classes as submitted (name, kind, prompt): for resuming
    rebuild_ids: list[int] = field(default_factory=list)  # `rebuild: true`: ids of the classes rebuilt in place

    def public(self) -> dict:
        classes = []
        for c in self.classes:
            t = self.tasks.get(c["key"])
            d = {k: v for k, v in c.items() if k != "key"}
            if t is not None:
                if d["outcome"] == "pending":
                    d["status"] = t.state
                d.update(attempts=t.attempts, workers_lost=t.workers_lost, events=list(t.events))
                if t.job != self.id:
                    d["shared_with"] = t.job
                if t.error:
                    d["reason"] = t.error
            classes.append(d)
        return {"job": self.id, "state": self.state, "bank": {"id": self.bank_id, "uri_hash": _uri_hash(self.uri)},
                "rebuild": bool(self.rebuild_ids),
                "base_version": self.base_version, "version": self.version, "committed": self.committed,
                "classes": classes, "created": round(self.created, 3),
                "finished": None if self.finished is None else round(self.finished, 3),
                "seconds": round((self.finished or time.time()) - self.created, 3), "error": self.error}


def _uri_hash(uri: str) -> str:
    import hashlib

    return hashlib.sha256(uri.encode()).hexdigest()[:12]


class _Pool:
    """Warm ClassWorker actors of one bank (one recipe, one shard location)."""

    def __init__(self, manager: "JobManager", uri: str, recipe: dict):
        self.manager, self.uri, self.recipe = manager, uri, recipe
        self.idle: list = []
        self.count = 0
        self.free = asyncio.Condition()
        self.last_used = time.monotonic()

    def _new(self):
        import ray

        from ..build_bank import ClassWorker, crf_workers
        from ..recipe import recipe_from_dict

        s = self.manager.settings
        crf = crf_workers(recipe_from_dict(self.recipe, "bank recipe"), s.cpus_per_worker)  # MaskCut's CRF beside it
        actor = ray.remote(ClassWorker).options(
            name=f"{WORKER_PREFIX}{uuid.uuid4().hex[:12]}", num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker,
            max_restarts=0, max_task_retries=0,
        ).remote(self.recipe, self.uri, self.manager.storage, s.retries, crf_workers=crf)
        self.count += 1
        return actor

    async def acquire(self):
        async with self.free:
            while not self.idle and self.count >= self.manager.settings.workers:
                await self.free.wait()
            self.last_used = time.monotonic()
            return self.idle.pop() if self.idle else self._new()

    async def release(self, actor, dead: bool = False):
        async with self.free:
            if dead:
                self.count -= 1
                _kill(actor)
            else:
                self.idle.append(actor)
            self.last_used = time.monotonic()
            self.free.notify()

    async def reap(self, idle_s: float) -> None:
        async with self.free:
            if self.idle and len(self.idle) == self.count and time.monotonic() - self.last_used > idle_s:
                for a in self.idle:
                    _kill(a)
                self.count -= len(self.idle)
                self.idle = []


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class JobManager:
    """Jobs by id, class builds shared between jobs, one commit lock per bank. Runs on one event loop."""

    def __init__(self, settings: BuildSettings | None = None, storage: dict | None = None):
        self.settings = settings or BuildSettings()
        self.storage = storage
        self.jobs: dict[str, Job] = {}
        self.inflight: dict[tuple[str, str], Task] = {}  # (uri, folded name) -> task
        self.pools: dict[str, _Pool] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.next_id: dict[str, int] = {}
        self.seq = 0  # commits made by jobs so far
        self.last_commit: dict = {}
        self.changed = asyncio.Condition()
        self._reaper: asyncio.Task | None = None
        self.uris: list[str] = []  # the followed banks: where job records are looked up and resumed from

    # -- API ---------------------------------------------------------------------------------------------------
    async def submit(self, uri: str, classes: list[dict], job_id: str | None = None, rebuild: bool = False) -> dict:
        """Classes (`name`, `kind`, `prompt`, already validated) for the bank at `uri` -> the job's first answer.
        `job_id`: a job resumed from its record keeps its id. `rebuild`: every class must be in the bank (or
        removed from it); each is drawn again from its kind and prompt here and replaces its entry in place (same
        label value). Without it, a class in the bank whose prompt or kind differs is `present` with
        `prompt_changed` and a hint, never rebuilt silently."""
        from ..build_bank import changed_classes
        from ..store.edits import name_index
        from ..vocab import VocabClass, fold

        if len(classes) > self.settings.max_classes_per_request:
            raise ValueError(f"too many classes: {len(classes)}, at most {self.settings.max_classes_per_request} "
                             "per request")
        m = await asyncio.to_thread(self._manifest, uri)
        index = name_index(m["classes"])
        wanted = [VocabClass(c["name"], c.get("kind", "thing"), c.get("prompt", "")) for c in classes]
        positions: set[int] = set()
        if rebuild:
            absent = [c.name for c in wanted if fold(c.name) not in index]
            if absent:
                raise ValueError(f"rebuild: not classes of bank {m['bank_id']} v{m['version']}: "
                                 f"{', '.join(repr(n) for n in absent)} (add them without `rebuild`)")
            positions = {index[fold(c.name)] for c in wanted}
            have = set()
        else:
            have = set(index)
        changed = {fold(c["name"]): c for c in changed_classes(m["classes"], wanted)}
        new = [c for c in wanted if fold(c.name) not in have and (uri, fold(c.name)) not in self.inflight]
        pending_now = sum(t.state in ("queued", "running") for t in self.inflight.values())
        if pending_now + len(new) > self.settings.max_pending_classes:
            raise Busy(f"too much pending work: {pending_now} classes queued or building, {len(new)} more asked, "
                       f"at most {self.settings.max_pending_classes}")
        job = Job(job_id or uuid.uuid4().hex[:JOB_ID_CHARS], uri, m["bank_id"], int(m["version"]), [],
                  to_build=[{k: c[k] for k in ("name", "kind", "prompt") if c.get(k)} for c in classes])
        from ..build_bank import pending_classes

        first = self.next_id.get(uri, 0)  # a proposal only: the commit re-derives new ids from what it extends
        found = pending_classes(m["classes"], new, first, rebuild=positions)
        rows = {fold(r["name"]): r for r in found}
        rows.update({fold(c.name): r for c in new for r in found if r["rebuild"]
                     and index.get(fold(c.name)) == index.get(fold(r["name"]))})  # asked for by an alias
        if any(not r["rebuild"] for r in found):
            self.next_id[uri] = max(r["class_id"] for r in found if not r["rebuild"]) + 1
        job.rebuild_ids = sorted(int(r["class_id"]) for r in found if r["rebuild"])
        for c in wanted:
            k = fold(c.name)
            entry = {"key": k, "name": c.name, "kind": c.kind}
            if c.prompt:
                entry["prompt"] = c.prompt
            if k in have:
                ch = changed.get(fold(m["classes"][index[k]]["name"]))
                entry["outcome"] = "removed" if ch is not None and "removed" in ch else "present"
                if ch is not None and "removed" in ch:
                    entry["hint"] = (f"removed in v{ch['removed']}; its label value {ch['position'] + 1} stays "
                                     "reserved: send it again with `rebuild: true` to bring it back there")
                elif ch is not None:
                    entry["prompt_changed"] = {"bank": ch["from"], "asked": ch["to"], "kind_bank": ch["kind_from"],
                                               "kind_asked": ch["kind_to"]}
                    entry["hint"] = ("the bank drew this class from other words or kind: send it again with "
                                     "`rebuild: true` to rebuild it in place (same label value)")
            else:
                t = self.inflight.get((uri, k))
                if t is None:
                    r = rows[k]
                    t = Task(r["name"], c.kind, c.prompt, r["class_id"], job.id)
                    self.inflight[(uri, k)] = t
                    asyncio.create_task(self._build(uri, m["recipe"], t))
                job.tasks[k] = t
                entry["outcome"] = "pending"
            job.classes.append(entry)
        self.jobs[job.id] = job
        self._forget_old()
        if not job.tasks:
            job.state, job.version, job.finished = "done", job.base_version, time.time()
        else:
            asyncio.create_task(self._run(job))
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())
        self._report()
        await asyncio.to_thread(self._persist, job)
        out = job.public()
        out["pending"] = [c["name"] for c in job.classes if c["outcome"] == "pending"]
        out["present"] = [c["name"] for c in job.classes if c["outcome"] == "present"]
        out["prompt_changed"] = [c["name"] for c in job.classes if "prompt_changed" in c]
        return out

    async def edit(self, uri: str, action: str, names: list[str]) -> dict:
        """`remove` (names), `rename` ([old, new]) or `alias` ([name, alias]) as one new version of the bank at
        `uri` (`store.edits.commit_edit`), under the bank's commit lock; followers reload as after a job.
        EditError (a ValueError) names the bad input; nothing is written then."""
        from ..store import edits
        from ..store.fs import Location

        ops = {"remove": lambda c, v: edits.remove(c, names, v), "rename": lambda c, v: edits.rename(c, *names),
               "alias": lambda c, v: edits.alias(c, *names)}
        if action not in ops:
            raise ValueError(f"unknown edit {action!r} (known: {', '.join(ops)})")
        change = {"removed": names} if action == "remove" else {f"{action}d": [names]}
        async with self.locks.setdefault(uri, asyncio.Lock()):
            m, summary = await asyncio.to_thread(edits.commit_edit, Location(uri, self.storage), ops[action], change)
        async with self.changed:
            self.seq += 1
            self.last_commit = {"bank_id": m["bank_id"], "version": m["version"], "edit": action}
            self.changed.notify_all()
        log.info("bank %s v%d: %s", m["bank_id"], m["version"], summary)
        return {"version": int(m["version"]), "bank_id": m["bank_id"], "summary": summary}

    def get(self, job_id: str) -> dict | None:
        j = self.jobs.get(job_id)
        return None if j is None else j.public()

    async def wait_commit(self, seen: int, timeout: float) -> dict:
        """Returns when a job has committed a version after commit number `seen` (or after `timeout` s)."""
        async with self.changed:
            if self.seq <= seen:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self.seq > seen), timeout)
                except asyncio.TimeoutError:
                    pass
            return {"seq": self.seq, **self.last_commit}

    def stats(self) -> dict:
        return {"jobs": len(self.jobs), "pending_classes": sum(t.state in ("queued", "running")
                                                               for t in self.inflight.values()),
                "workers": {k[:12]: p.count for k, p in self.pools.items()}, "commits": self.seq}

    # -- work --------------------------------------------------------------------------------------------------
    def _manifest(self, uri: str) -> dict:
        from ..store.fs import Location
        from ..store.shards import read_manifest

        m = read_manifest(Location(uri, self.storage))
        if m is None:
            raise ValueError(f"{uri}: no committed bank there")
        return m

    def _pool(self, uri: str, recipe: dict) -> _Pool:
        key = json.dumps([uri, recipe], sort_keys=True)
        if key not in self.pools:
            self.pools[key] = _Pool(self, uri, recipe)
        return self.pools[key]

    async def _build(self, uri: str, recipe: dict, t: Task) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError

        logs.set_context(job_id=t.job)
        pool = self._pool(uri, recipe)
        t0 = time.perf_counter()
        try:
            for attempt in range(1, self.settings.worker_retries + 2):
                actor = await pool.acquire()
                t.state = "running"
                try:
                    r = await actor.build_one.remote(t.class_id, t.name, t.kind, t.prompt)
                except (RayActorError, ActorUnavailableError) as e:
                    await pool.release(actor, dead=True)
                    t.workers_lost += 1
                    why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    t.events.append(f"worker lost during attempt {attempt} ({type(e).__name__}: {why})"
                                    + ("; retrying on a new worker" if attempt <= self.settings.worker_retries
                                       else ""))
                    log.warning("class %r: worker lost (%s), attempt %d", t.name, type(e).__name__, attempt)
                    continue
                await pool.release(actor)
                t.attempts += int(r["attempts"])
                if r["status"] == "ok":
                    t.entry, t.state = json.loads(r["entry"]), "built"
                else:
                    t.error, t.state = r["error"].splitlines()[0], "failed"
                return
            t.state = "failed"
            t.error = f"worker lost {t.workers_lost} times (the class was tried on {t.workers_lost} workers)"
        except Exception as e:  # noqa: BLE001 - reported on the job, never a crash of the manager
            t.state, t.error = "failed", f"{type(e).__name__}: {e}"[:500]
        finally:
            t.seconds = time.perf_counter() - t0
            t.done.set()

    def _report(self) -> None:
        """`ovdiff_jobs` by state (the jobs this manager remembers)."""
        counts = dict.fromkeys(("queued", "running", "done", "failed"), 0)
        for j in self.jobs.values():
            counts[j.state] = counts.get(j.state, 0) + 1
        for state, n in counts.items():
            metrics.set_gauge("ovdiff_jobs", n, {"state": state})

    def _persist(self, job: Job) -> None:
        """The job's record beside its bank (`job_records.py`); a storage hiccup is logged, never fatal."""
        from ..store.fs import Location

        try:
            job_records.save(Location(job.uri, self.storage), job.public(), job.to_build)
        except Exception as e:  # noqa: BLE001 - the job goes on; its record is written again at its next step
            log.warning("job %s: record not written: %s: %s", job.id, type(e).__name__, e)

    def record(self, job_id: str) -> dict | None:
        """A job no longer in memory (a manager restarted, or forgotten): its record from the followed banks."""
        from ..store.fs import Location

        for uri in self.uris:
            try:
                rec = job_records.load(Location(uri, self.storage), job_id)
            except Exception as e:  # noqa: BLE001 - unreadable: as if absent, logged
                log.warning("job %s: record in %s unreadable: %s", job_id, _uri_hash(uri), e)
                continue
            if rec is not None:
                return job_records.public(rec)
        return None

    async def recover(self) -> list[str]:
        """Resume the jobs whose records say they had not ended; returns their ids."""
        from ..store.fs import Location

        resumed = []
        for uri in self.uris:
            try:
                recs = await asyncio.to_thread(job_records.unfinished, Location(uri, self.storage))
            except Exception as e:  # noqa: BLE001 - storage down: nothing to resume from it now
                log.warning("job records of bank %s unreadable: %s", _uri_hash(uri), e)
                continue
            for rec in recs:
                if rec["job"] in self.jobs:
                    continue
                try:
                    await self.submit(uri, rec["resume"]["classes"], job_id=rec["job"], rebuild=bool(rec.get("rebuild")))
                    resumed.append(rec["job"])
                    log.info("job %s resumed from its record (%d classes)", rec["job"],
                             len(rec["resume"]["classes"]))
                except Exception as e:  # noqa: BLE001 - one bad record never stops the others
                    log.warning("job %s not resumed: %s: %s", rec["job"], type(e).__name__, e)
        return resumed

    async def _run(self, job: Job) -> None:
        logs.set_context(job_id=job.id, bank_id=job.bank_id, bank_version=job.base_version)  # this task's lines
        job.state = "running"
        self._report()
        await asyncio.to_thread(self._persist, job)
        try:
            await asyncio.gather(*(t.done.wait() for t in job.tasks.values()))
            entries = [t.entry for t in job.tasks.values() if t.state == "built"]
            failed = [{"name": t.name, "error": t.error, "attempts": t.attempts} for t in job.tasks.values()
                      if t.state == "failed"]
            lock = self.locks.setdefault(job.uri, asyncio.Lock())
            async with lock:
                version, committed, present = await asyncio.to_thread(self._commit, job, entries, failed)
            job.version, job.committed = version, committed
            for c in job.classes:
                t = job.tasks.get(c["key"])
                if t is None:
                    continue
                if t.state == "built" and c["key"] in present:
                    c["outcome"] = "built"
                else:
                    c["outcome"] = "failed"
                    if t.state == "built":
                        t.error = "built but not in the committed version"
            job.state = "failed" if any(c["outcome"] == "failed" for c in job.classes) else "done"
            if committed:
                async with self.changed:
                    self.seq += 1
                    self.last_commit = {"bank_id": job.bank_id, "version": version, "job": job.id}
                    self.changed.notify_all()
            log.info("job %s %s: bank %s v%s (%s)", job.id, job.state, job.bank_id, version,
                     ", ".join(f"{c['name']}: {c['outcome']}" for c in job.classes))
        except Exception as e:  # noqa: BLE001
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"[:500]
            log.exception("job %s failed", job.id)
        finally:
            job.finished = time.time()
            self._report()
            await asyncio.to_thread(self._persist, job)
            for c in job.classes:
                if c["outcome"] in ("built", "failed"):
                    metrics.inc("ovdiff_job_classes", 1, {"outcome": c["outcome"]})
            for k, t in job.tasks.items():
                if self.inflight.get((job.uri, k)) is t and t.job == job.id:
                    del self.inflight[(job.uri, k)]

    def _commit(self, job: Job, entries: list[dict], failed: list[dict]) -> tuple[int, bool, set[str]]:
        """build_bank's commit: latest + the new classes as v(N+1), merged with any writer that won a race."""
        from ..build_bank import BuildState
        from ..store.fs import Location
        from ..vocab import fold, from_names

        loc = Location(job.uri, self.storage)
        m = self._manifest(job.uri)
        names = [c["name"] for c in job.classes]
        vocab = from_names(names, [c["kind"] for c in job.classes], f"job-{job.id}",
                           [c.get("prompt", "") for c in job.classes])
        state = BuildState.of(loc, m, vocab)
        state.pending_entries, state.failed = list(entries), list(failed)
        state.rebuild_ids = set(job.rebuild_ids)
        committed = state.commit() if entries else False
        from ..store.edits import name_index

        return state.version, committed, set(name_index([c for c in state.committed if c.get("removed") is None]))

    def _forget_old(self) -> None:
        done = [j for j in self.jobs.values() if j.finished is not None]
        for j in sorted(done, key=lambda j: j.created)[: max(0, len(self.jobs) - self.settings.max_jobs_kept)]:
            self.jobs.pop(j.id, None)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.settings.idle_s))
            for p in list(self.pools.values()):
                await p.reap(self.settings.idle_s)


@serve.deployment(name=JOBS, num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class BankJobsDeployment:
    """The job manager as a Serve deployment of the app: one replica, lives and dies with the application."""

    def __init__(self):
        logs.configure()  # OVDIFF_LOG_FORMAT=json: JSON lines
        self.manager: JobManager | None = None

    async def reconfigure(self, user_config: dict):
        if self.manager is None:
            self.manager = JobManager(BuildSettings.from_dict(user_config.get("build")), user_config.get("storage"))
            self.manager.uris = list(user_config.get("banks") or [])
            asyncio.get_running_loop().create_task(self.manager.recover())  # jobs a dead manager left unfinished
        else:  # keep the jobs; new settings apply to new workers
            self.manager.settings = BuildSettings.from_dict(user_config.get("build"))

    async def submit(self, uri: str, classes: list[dict], rebuild: bool = False) -> dict:
        try:
            return {"status": 202, **(await self.manager.submit(uri, classes, rebuild=rebuild))}
        except Busy as e:
            return {"status": 429, "error": str(e), "code": "busy", "detail": {"retry_after_s": 5}}
        except ValueError as e:
            return {"status": 400, "error": str(e), "code": "bad_request", "detail": None}

    async def edit(self, uri: str, action: str, names: list[str]) -> dict:
        try:
            return {"status": 200, **(await self.manager.edit(uri, action, names))}
        except ValueError as e:
            return {"status": 400, "error": str(e), "code": "bad_edit", "detail": None}

    async def get(self, job_id: str) -> dict | None:
        found = self.manager.get(job_id)
        if found is None:
            found = await asyncio.to_thread(self.manager.record, job_id)
        return found

    async def wait_commit(self, seen: int, timeout: float) -> dict:
        return await self.manager.wait_commit(seen, timeout)

    async def stats(self) -> dict:
        return self.manager.stats()
