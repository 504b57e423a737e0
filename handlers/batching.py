"""Adaptive batching for the KServe path: concurrent requests of one process share one forward pass.

TorchServe batches in its frontend (batchSize, maxBatchDelay); KServe's ModelServer hands each request to
the model on its own. This batcher sits between the KServe adapter and the model, in the server's event
loop. The policy is the one Triton's dynamic batcher has with no queue delay:

- a request that arrives while the model is idle runs at once: nothing to wait for, no fixed delay;
- requests that arrive while the model runs queue up, and the next pass takes all of them (up to
  `max_images`), so the batch grows with the load by itself;
- a request of more images than `max_images` runs alone, as one pass.

The model runs in one thread beside the event loop (ONNX Runtime and torch release the GIL), so the loop
keeps reading, decoding and answering requests during a pass. That hop to the thread and back costs about
0.1 ms, which a process that serves one request at a time pays for nothing: after QUIET_PASSES passes in a
row during which no other request arrived, passes run on the event loop itself, and every PROBE_EVERY-th
request still goes through the thread to find out whether others now arrive while it runs; the first pass
that finds company switches back. Each request keeps its own answer: its rows
of the pass's output; an error in the pass fails every request of that pass. Decoding errors never reach
the batcher: the adapter refuses such a request before it queues (handlers/contract.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QUIET_PASSES = 8  # passes without company before passes run on the event loop
PROBE_EVERY = 8  # on the event loop, every 8th request runs in the thread to look for company again


class AdaptiveBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_images: int):
        self.infer, self.max_images = infer, max(1, max_images)
        self.queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.running = False
        self.passes = self.images = 0  # what ran so far: the mean batch is images / passes
        self.quiet = 0  # passes in a row during which no other request arrived

    async def run(self, batch: np.ndarray) -> np.ndarray:
        """One request's normalized images (N, C, H, W) -> its rows of the model's output."""
        if self.quiet >= QUIET_PASSES and not self.running and (self.passes + 1) % PROBE_EVERY:
            self.passes, self.images = self.passes + 1, self.images + len(batch)
            return self.infer(batch)  # alone: nothing can join a pass, so no hop to the thread
        future = asyncio.get_running_loop().create_future()
        self.queue.append((batch, future))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self.drain())
        return await future

    def take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The next pass: the oldest request, and those after it while they fit in max_images."""
        taken = [self.queue.popleft()]
        images = len(taken[0][0])
        while self.queue and images + len(self.queue[0][0]) <= self.max_images:
            taken.append(self.queue.popleft())
            images += len(taken[-1][0])
        return taken

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                taken = self.take()
                batches = [batch for batch, _ in taken]
                try:
                    stacked = batches[0] if len(batches) == 1 else np.concatenate(batches)
                    output = await loop.run_in_executor(self.executor, self.infer, stacked)
                except Exception as error:  # the model failed: every request of this pass gets the error
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self.passes, self.images = self.passes + 1, self.images + len(stacked)
                self.quiet = 0 if len(taken) > 1 or self.queue else self.quiet + 1  # company during the pass?
                start = 0
                for batch, future in taken:
                    if not future.done():  # a client that went away cancels its future
                        future.set_result(output[start:start + len(batch)])
                    start += len(batch)
        finally:
            self.running = False
