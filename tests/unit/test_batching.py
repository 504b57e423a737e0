"""handlers/batching.py: concurrent requests share a forward pass, a lone request runs at once, each request
gets its own rows, and a failed pass fails only the requests in it."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from handlers.batching import AdaptiveBatcher


class SlowModel:
    """A real function on real arrays, slow enough that requests arrive while it runs: each image's "logits"
    are its own values, so a request can check it got its own rows. Records every pass's batch size."""

    def __init__(self, release: threading.Event | None = None, fail_on: float | None = None):
        self.passes: list[int] = []
        self.threads: list[str] = []  # where each pass ran
        self.release, self.fail_on = release, fail_on

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.release is not None:
            self.release.wait(10)
        self.passes.append(len(batch))
        self.threads.append("loop" if threading.current_thread() is threading.main_thread() else "thread")
        if self.fail_on is not None and (batch == self.fail_on).any():
            raise RuntimeError("the model failed")
        return batch.reshape(len(batch), -1)[:, :2] * 2


def images(value: float, count: int = 1) -> np.ndarray:
    return np.full((count, 1, 2, 2), value, np.float32)


def test_a_lone_request_runs_at_once_in_a_pass_of_its_own():
    model = SlowModel()
    batcher = AdaptiveBatcher(model, max_images=16)

    async def one_after_another():
        return [await batcher.run(images(v)) for v in (1.0, 2.0, 3.0)]

    answers = asyncio.run(one_after_another())
    assert model.passes == [1, 1, 1]
    assert [float(a[0, 0]) for a in answers] == [2.0, 4.0, 6.0]


def test_requests_that_arrive_during_a_pass_share_the_next_one_and_get_their_own_rows():
    release = threading.Event()
    model = SlowModel(release)
    batcher = AdaptiveBatcher(model, max_images=32)

    async def burst():
        first = asyncio.ensure_future(batcher.run(images(100.0)))
        await asyncio.sleep(0.05)  # the first pass is running (held by `release`)
        rest = [asyncio.ensure_future(batcher.run(images(float(v), count=1 + v % 3))) for v in range(10)]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(burst())
    assert model.passes == [1, sum(1 + v % 3 for v in range(10))]  # 19 images in the second pass
    assert float(first[0, 0]) == 200.0
    for v, answer in enumerate(rest):
        assert answer.shape == (1 + v % 3, 2) and (answer == 2.0 * v).all()


def test_a_pass_takes_at_most_max_images_and_a_larger_request_runs_alone():
    release = threading.Event()
    model = SlowModel(release)
    batcher = AdaptiveBatcher(model, max_images=8)

    async def burst():
        held = asyncio.ensure_future(batcher.run(images(0.0)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.run(images(1.0, count))) for count in (3, 3, 3, 20, 2)]
        await asyncio.sleep(0.05)
        release.set()
        await held
        return await asyncio.gather(*queued)

    answers = asyncio.run(burst())
    assert model.passes == [1, 6, 3, 20, 2]  # in arrival order, never more than 8 but for the one of 20
    assert [len(a) for a in answers] == [3, 3, 3, 20, 2]


def test_a_failed_pass_fails_its_requests_and_the_next_pass_serves_again():
    release = threading.Event()
    model = SlowModel(release, fail_on=-1.0)
    batcher = AdaptiveBatcher(model, max_images=16)

    async def burst():
        held = asyncio.ensure_future(batcher.run(images(-1.0)))
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(RuntimeError, match="the model failed"):
            await held
        return await batcher.run(images(5.0))

    assert float(asyncio.run(burst())[0, 0]) == 10.0
    assert model.passes == [1, 1]


def test_a_process_serving_one_request_at_a_time_runs_passes_on_the_loop_and_probes_for_company():
    from handlers.batching import PROBE_EVERY, QUIET_PASSES

    model = SlowModel()
    batcher = AdaptiveBatcher(model, max_images=16)

    async def alone_then_a_burst():
        answers = [await batcher.run(images(float(v))) for v in range(40)]
        # a burst while on the loop: the next probe's pass finds company and batching is back
        burst = [asyncio.ensure_future(batcher.run(images(1.0))) for _ in range(2 * PROBE_EVERY)]
        await asyncio.gather(*burst)
        return answers

    answers = asyncio.run(alone_then_a_burst())
    assert [float(a[0, 0]) for a in answers] == [2.0 * v for v in range(40)]  # each its own answer
    lone = model.threads[:40]
    assert lone[:QUIET_PASSES] == ["thread"] * QUIET_PASSES  # until it has seen QUIET_PASSES passes alone
    probes = [i for i in range(QUIET_PASSES, 40) if lone[i] == "thread"]
    assert probes and all((i + 1) % PROBE_EVERY == 0 for i in probes)
    assert lone.count("loop") == 40 - QUIET_PASSES - len(probes)
    assert max(model.passes[40:]) > 1 and model.threads[-1] == "thread"  # the burst shares passes in the thread
