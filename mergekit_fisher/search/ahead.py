"""Candidates merged ahead of their scoring, in worker processes.

A candidate's merge (mergekit's ``run_merge``, what ``mergekit-yaml`` runs, into a scratch
directory) needs no score, so while one merged model is scored the next ones are merged. On a
CPU box merges and scoring then share the cores (mergekit's ``ties`` and ``della`` spend most of
a merge in a single-threaded sort); with a GPU scorer the merges overlap its work. Merges run
with ``random_seed`` 0, so DARE drops the same weights in a worker as in-process. At most
``workers + 1`` merged models wait on disk.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import logging
import logging.handlers
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_fisher.search.candidates import SearchError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Merged:
    """A merged candidate on disk and how long its merge took."""

    path: Path
    seconds: float


def merge_into(recipe: Mapping[str, Any], out: Path, options: Mapping[str, Any]) -> float:
    """``recipe`` through mergekit's ``run_merge`` into ``out``; the seconds it took."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    started = time.perf_counter()
    run_merge(
        MergeConfiguration.model_validate(copy.deepcopy(dict(recipe))),
        str(out),
        options=MergeOptions(
            **{"copy_tokenizer": False, "quiet": True, "write_model_card": False}
            | {"random_seed": 0}
            | dict(options)
        ),
    )
    return time.perf_counter() - started


def default_workers() -> int:
    """One merge worker where there is a second core to run it on."""
    return 1 if len(os.sched_getaffinity(0)) > 1 else 0


@contextlib.contextmanager
def merged_ahead(
    recipes: Sequence[Mapping[str, Any]],
    scratch: Path,
    options: Mapping[str, Any],
    workers: int,
) -> Iterator[Iterator[Merged]]:
    """Each recipe merged into ``scratch``, in order; ``workers`` processes merge ahead (0:
    each merge in this process when it is asked for). The caller deletes each ``path``."""
    if workers <= 0:
        yield (
            Merged(scratch / f"candidate-{i}", merge_into(r, scratch / f"candidate-{i}", options))
            for i, r in enumerate(recipes)
        )
        return
    context = multiprocessing.get_context("spawn")  # never fork a process running torch
    records = context.Queue()
    listener = logging.handlers.QueueListener(records, _Relay())
    level = logging.getLogger("mergekit_fisher").getEffectiveLevel()
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(_worker_threads(workers), records, level),
    )
    listener.start()
    try:
        yield _in_order(recipes, scratch, options, pool, window=workers + 1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        listener.stop()


def _in_order(
    recipes: Sequence[Mapping[str, Any]],
    scratch: Path,
    options: Mapping[str, Any],
    pool: concurrent.futures.Executor,
    window: int,
) -> Iterator[Merged]:
    """Keep ``window`` merges submitted; hand them out in the recipes' order."""
    todo = iter(enumerate(recipes))
    pending: deque[tuple[Path, concurrent.futures.Future[float]]] = deque()

    def submit() -> None:
        for i, recipe in todo:
            out = scratch / f"candidate-{i}"
            pending.append((out, pool.submit(_merge_in_worker, recipe, out, options)))
            return

    for _ in range(window):
        submit()
    while pending:
        out, future = pending.popleft()
        seconds = future.result()
        submit()
        yield Merged(out, seconds)


def _worker_threads(workers: int) -> int:
    """Torch threads per worker: the cores shared between the workers and the scorer."""
    return max(1, len(os.sched_getaffinity(0)) // (workers + 1))


class _Relay(logging.Handler):
    """Hands a worker's log record to this process's logger of the same name."""

    def handle(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
        return True


def _start_worker(threads: int, records: Any, level: int) -> None:
    """Torch threads, our methods registered, and logging sent to the parent (``_Relay``)."""
    import torch

    from mergekit_fisher.methods import register_methods

    torch.set_num_threads(threads)
    register_methods()
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(records)]
    root.setLevel(logging.WARNING)
    logging.getLogger("mergekit_fisher").setLevel(level)


def _merge_in_worker(recipe: Mapping[str, Any], out: Path, options: Mapping[str, Any]) -> float:
    """``merge_into`` with its error as a one-line ``SearchError`` (any exception a merge
    raises must cross the process boundary, and not every one pickles)."""
    try:
        return merge_into(recipe, out, options)
    except Exception as error:
        raise SearchError(f"merging {out.name}: {type(error).__name__}: {error}") from None
