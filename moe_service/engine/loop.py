"""The engine's thread: steps while there is work, sleeps on a condition otherwise. Other jobs (Forward
requests, table switches) run on the same thread between steps."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

from moe_service.engine.clock import name_os_thread
from moe_service.engine.engine import Engine, StepStats
from moe_service.engine.sampling import SamplingParams
from moe_service.engine.sequence import Event, Sequence


class EngineLoop:
    def __init__(self, engine: Engine, after_step: Callable[[StepStats], None] | None = None) -> None:
        self.engine, self.after_step = engine, after_step
        self.cv = threading.Condition()
        self.jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None],
               timeout_s: float | None = None, workload: int = 0) -> Sequence:
        seq = self.engine.add(prompt, params, emit, timeout_s, workload)
        self._wake()
        return seq

    def cancel(self, seq: Sequence) -> None:
        self.engine.cancel(seq)
        self._wake()

    def run_job(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        with self.cv:
            self.jobs.append((fn, fut))
            self.cv.notify()
        return fut

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(10)

    def _wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def _run(self) -> None:
        name_os_thread("moe-engine")
        engine = self.engine
        while True:
            with self.cv:
                while not self.stopping and not self.jobs and not engine.has_work:
                    self.cv.wait()
                if self.stopping:
                    return
                jobs = list(self.jobs)
                self.jobs.clear()
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
            if engine.has_work:
                try:
                    stats = engine.step()
                except Exception as e:  # a bug outside any micro-batch: fail the running requests, keep serving
                    engine.fail_running(e)
                    stats = StepStats(failures=["error"])
                if self.after_step is not None:
                    self.after_step(stats)
