"""Loading the frames of many entries in worker processes, in entry order, so that one crashing decoder costs one item.

A decoder that kills its process (a crash in FFmpeg on a broken file) fails that one entry: the entries that were
in flight are retried one by one, each in a fresh process. Results come back in entry order through a bounded
look-ahead window, so memory stays bounded and the writer sees records in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import multiprocessing
from typing import Any, Callable, Iterator, Sequence

from cma_jax.data import video


def _load_one(loader, entry):
    if not entry.captions:
        return None  # skipped by the caller; no need to decode
    return video.load_or_error(loader, entry.source, entry.video_id)


def _submit(pool, loader, entry) -> concurrent.futures.Future:
    if not entry.captions:
        done = concurrent.futures.Future()
        done.set_result(None)
        return done
    # Only cma_jax.data.video travels: the workers never import TFDS.
    try:
        return pool.submit(video.load_or_error, loader, entry.source, entry.video_id)
    except concurrent.futures.process.BrokenProcessPool as e:
        # A worker died since the last result (e.g. while the build wrote a record): fail this future
        # like the ones in flight, so `load_all` retries it in isolation instead of stopping.
        failed = concurrent.futures.Future()
        failed.set_exception(e)
        return failed


def load_all(loader: Callable[[Any], list[bytes]], entries: Sequence, workers: int) -> Iterator[tuple[Any, Any]]:
    """(entry, frames or the VideoDecodeError) in entry order, loaded by `workers` processes (<= 1: here)."""
    if workers <= 1 or len(entries) < 2:
        for entry in entries:
            yield entry, _load_one(loader, entry)
        return
    # spawn: the parent may hold threads (JAX, TFDS) that fork would copy in a broken state.
    ctx = multiprocessing.get_context("spawn")
    pending = collections.deque(entries)
    inflight: collections.deque = collections.deque()
    window = 4 * workers  # bounded look-ahead keeps order and memory bounded
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        while pending or inflight:
            while pending and len(inflight) < window:
                entry = pending.popleft()
                inflight.append((entry, _submit(pool, loader, entry)))
            entry, fut = inflight.popleft()
            try:
                result = fut.result()
            except concurrent.futures.process.BrokenProcessPool:
                pool.shutdown(cancel_futures=True)
                inflight.appendleft((entry, fut))
                for e, f in inflight:
                    ok = f.done() and not f.cancelled() and f.exception() is None
                    yield e, f.result() if ok else _load_isolated(loader, e, ctx)
                inflight.clear()
                pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
                continue
            yield entry, result
    finally:
        pool.shutdown(cancel_futures=True)


def _load_isolated(loader, entry, ctx):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return _submit(pool, loader, entry).result()
        except concurrent.futures.process.BrokenProcessPool:
            return video.VideoDecodeError(f"the decoder crashed on {entry.source}")
