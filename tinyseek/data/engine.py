"""``tinyseek data`` on datatrove's executors: the stages of :mod:`tinyseek.data.steps`, each run as
many tasks by a local process pool (default), a Ray cluster, or Slurm job arrays.

- **local**: ``--workers N`` processes on this machine (default: every core it may use), forked from
  this process. ``--workers 1`` runs every task in this process.
- **ray**: ``--ray-address`` of a running cluster (``ray start --head`` on one node, ``ray start
  --address ...`` on the others; every node needs this Python environment and the run folder on a
  shared file system), or "" to start Ray on this machine. ``--workers`` tasks at once, one CPU each.
- **slurm**: one job array per stage, chained with ``afterok`` dependencies, submitted with
  ``sbatch`` from this Python environment (``--slurm-partition``, ``--slurm-time``); the command
  returns once they are queued. The run folder must be on a shared file system. Not tested here.

The work folder ``<run>/data.work`` holds each stage's outputs and datatrove's logs and completion
markers (``logs/<stage>/completions``). A killed run started again with the same settings and inputs
skips every task already marked complete; with other settings or changed inputs it starts over (the
folder's ``settings.json`` says which). On success the output folder is renamed into place and the
work folder removed. Only one data stage runs on a run folder at a time (a lock beside it).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import datatrove.executor.base as dt_base
import multiprocess
import numpy as np
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.utils.logging import logger
from datatrove.utils.stats import PipelineStats

from tinyseek.data import dedup as D
from tinyseek.data import steps as S
from tinyseek.data.decontam import eval_ngrams
from tinyseek.data.settings import Config, cpu_count
from tinyseek.data.sources import Source
from tinyseek.errors import UserError

ENGINE_FIELDS = ("executor", "workers", "tasks", "ray_address", "slurm_partition", "slurm_time", "quiet")
_LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"


def plan(cfg: Config) -> tuple[int, int, int]:
    """``(workers, tasks, bucket tasks)``: tasks default to the workers; the bucket stage has one task
    per LSH band at most."""
    workers = cfg.workers or cpu_count()
    tasks = cfg.tasks or workers
    bands, _ = D.lsh_params(cfg.near_dup_threshold, cfg.num_perm)
    return workers, tasks, max(1, min(tasks, bands))


def work_dir(cfg: Config) -> Path:
    return cfg.out_dir.parent / f"{cfg.out_dir.name}.work"


def fingerprint(cfg: Config, sources: list[Source], tasks: int, buckets: int) -> dict:
    """What the work folder's contents depend on: the settings (not how they are executed), the
    task counts, and every input file's path, size and modification time."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ENGINE_FIELDS}
    files = []
    for s in sources:
        for f in s.files:
            st = f.stat()
            files.append([str(f), st.st_size, st.st_mtime_ns])
        if not s.files:
            files.append([s.name, s.origin, json.dumps(s.meta, sort_keys=True, default=str)])
    return {"settings": settings, "tasks": tasks, "buckets": buckets, "inputs": files}


# ------------------------------------------------------------------------------------------------
# datatrove executors that keep the console quiet (each task logs to its file under logs/<stage>/logs)
# ------------------------------------------------------------------------------------------------
def _file_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, colorize=False, level="DEBUG", format=_LOG_FORMAT)
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def quiet_console() -> None:
    """Only warnings and errors of datatrove's reach the console."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}")


@contextlib.contextmanager
def _task_logs_to_files():
    mods = [m for m in (dt_base, sys.modules.get("datatrove.executor.ray")) if m is not None]
    saved = [m.add_task_logger for m in mods]
    for m in mods:
        m.add_task_logger = _file_logger
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.add_task_logger = f
        quiet_console()


class _Quiet:
    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with _task_logs_to_files():
            return super()._run_for_rank(rank, local_rank, node_rank)


def _die_with_parent() -> None:
    """In a pool worker: the kernel kills it when the run's process dies (Linux), so a killed run
    leaves no worker finishing a task behind the back of the run that resumes it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


class RayExecutor(_Quiet, RayPipelineExecutor):
    """datatrove's Ray executor, task logs to files."""


class SlurmExecutor(_Quiet, SlurmPipelineExecutor):
    """datatrove's Slurm executor, task logs to files."""


def _ray():
    """The ``ray`` module (optional: ``--executor ray`` only; 0.4 s to import)."""
    import ray
    return ray


class LocalExecutor(_Quiet, LocalPipelineExecutor):
    """datatrove's local executor (its task runner, logs, completion markers and stats), with workers
    forked from this process (no re-import per worker) that die with it, and no manager process
    (datatrove's would outlive a killed run)."""

    def run(self):
        self._launched = True
        ranks = self.get_incomplete_ranks(range(self.local_rank_offset, self.local_rank_offset + self.local_tasks))
        if not ranks:
            return PipelineStats()
        self.save_executor_as_json()
        if self.workers == 1:
            stats = []
            pipeline = self.pipeline
            for rank in ranks:
                self.pipeline = copy.deepcopy(pipeline)
                stats.append(self._run_for_rank(rank))
            self.pipeline = pipeline
        else:
            ctx = multiprocess.get_context("fork")
            with ctx.Pool(min(self.workers, len(ranks)), initializer=_die_with_parent) as pool:
                stats = list(pool.imap_unordered(self._run_for_rank, ranks))
        total = sum(stats, start=PipelineStats())
        with self.logging_dir.open("stats.json", "wt") as f:
            total.save_to_disk(f)
        return total


def _executor(cfg: Config, step, tasks: int, workers: int, logs: Path, depends=None):
    if cfg.executor == "local":
        return LocalExecutor([step], tasks=tasks, workers=workers, logging_dir=str(logs))
    if cfg.executor == "ray":
        if not cfg.ray_address:  # Ray on this machine: its warning about a local logging folder does not apply
            logger.remove()
            logger.add(sys.stderr, level="ERROR", format="{level}: {message}")
        ex = RayExecutor([step], tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs), cpus_per_task=1)
        quiet_console()
        return ex
    return SlurmExecutor([step], tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition, cpus_per_task=1,
                         workers=workers, job_name=f"tinyseek-data-{step.stage}", logging_dir=str(logs),
                         depends=depends, venv_path=str(Path(sys.prefix) / "bin" / "activate"))


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def _lock(cfg: Config) -> int:
    path = cfg.out_dir.parent / f".{cfg.out_dir.name}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another data stage is running on {cfg.out_dir.parent} (lock {path}); wait for it or "
                        "choose another --run-dir") from None
    return fd


def _prepare(cfg: Config, work: Path, fp: dict) -> bool:
    """Make ``work`` hold ``fp``'s run; True when an unfinished run's completed tasks can be reused."""
    f = work / "settings.json"
    if f.exists():
        try:
            same = json.loads(f.read_text()) == json.loads(json.dumps(fp))
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            shutil.rmtree(work / "errors", ignore_errors=True)
            return True
        if not cfg.quiet:
            print(f"starting over: the settings or inputs changed since the unfinished run in {work}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chmod(work, 0o700)
    S.save_json(f, fp)
    return False


def _error(work: Path, stage: str, logs: Path, cause: BaseException | None) -> Exception:
    for p in sorted((work / "errors").glob(f"{stage}-*.json")):
        return UserError(json.loads(p.read_text())["error"])
    why = f": {type(cause).__name__}: {cause}" if cause else ""
    return RuntimeError(f"data stage '{stage}' did not finish{why}; task logs in {logs / 'logs'}; "
                        "run the same command again to resume")


def run(cfg: Config, sources: list[Source]) -> dict:
    """Run every stage; returns the mix stage's result (report, shard indexes, weights, vocab size),
    or ``{"submitted": ...}`` for Slurm."""
    t_start = time.perf_counter()
    workers, tasks, buckets = plan(cfg)
    work = work_dir(cfg)
    cfg.out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(cfg)
    try:
        resumed = _prepare(cfg, work, fingerprint(cfg, sources, tasks, buckets))
        S.save_sources(work / "sources.json", sources)
        setup = {}
        if cfg.decontaminate and cfg.decontam_problems and not (work / "grams.npy").exists():
            t0, c0 = time.perf_counter(), time.process_time()
            grams = np.fromiter(sorted(eval_ngrams(cfg.decontam_n, cfg.decontam_problems)), dtype=np.uint64)
            S.save_npy(work / "grams.npy", grams)
            setup["decontam_ngrams"] = round(time.perf_counter() - t0, 3)
            (work / "cpu").mkdir(exist_ok=True)
            S.save_json(work / "cpu" / "setup.json", {"cpu_seconds": time.process_time() - c0})
        # the tokenizers library's threads a task (workers inherit it; restored for the rest of this process)
        threads = os.environ.get("RAYON_NUM_THREADS") or str(max(1, cpu_count() // workers))
        cfg_dict = dataclasses.asdict(cfg)
        counts = {"filter": tasks, "buckets": buckets, "tokenize": tasks, "score": tasks}
        walls: dict[str, float] = {}
        reused: dict[str, int] = {}  # stage -> tasks found complete (a resumed run)
        ray_started = False
        if cfg.executor == "ray":
            ray = _ray()
            if not ray.is_initialized():
                ray.init(address=cfg.ray_address or None, num_cpus=None if cfg.ray_address else workers,
                         include_dashboard=False, log_to_driver=False, logging_level="ERROR")
                ray_started = True
        quiet_console()
        prev = None
        with contextlib.ExitStack() as scope:
            scope.enter_context(S.env_set("RAYON_NUM_THREADS", threads))
            if ray_started:
                scope.callback(_ray().shutdown)
            for cls in S.STEPS:
                n = counts.get(cls.stage, 1)
                logs = work / "logs" / cls.stage
                step = cls(cfg_dict, str(work), tasks, buckets)
                if cls is S.MixStep and cfg.executor != "slurm":
                    S.save_json(work / "walls.json", {"executor": cfg.executor, "workers": workers, "tasks": tasks,
                                                      "bucket_tasks": buckets, "resumed": resumed,
                                                      "tasks_reused": reused,
                                                      "stage_seconds": walls, "setup_seconds": setup,
                                                      "elapsed_s": time.perf_counter() - t_start})
                ex = _executor(cfg, step, n, workers, logs, depends=prev)
                if cfg.executor == "slurm":
                    prev = ex
                    continue
                t0 = time.perf_counter()
                done = n - len(ex.get_incomplete_ranks(skip_completed=True))
                if done:
                    reused[cls.stage] = done
                try:
                    ex.run()
                    failed = bool(ex.get_incomplete_ranks(skip_completed=True))
                except Exception as e:  # noqa: BLE001 (a task's error: shown as ours, with where to look)
                    failed, cause = True, e
                else:
                    cause = None
                if failed:
                    err = _error(work, cls.stage, logs, cause)
                    if isinstance(err, UserError):  # the same settings and inputs would fail again
                        shutil.rmtree(work, ignore_errors=True)
                    raise err from None
                walls[cls.stage] = round(time.perf_counter() - t0, 3)
        if cfg.executor == "slurm":
            prev.run()  # submits the chain, each array after the one it depends on
            return {"submitted": True, "work_dir": str(work), "out_dir": str(cfg.out_dir)}
        result = json.loads((work / "mix" / "result.json").read_text())
        shutil.rmtree(work, ignore_errors=True)
        return result
    finally:
        os.close(lock)
