"""TorchServe's own ceiling: a handler that does no work.

It answers every request of a batch with the same small constant JSON, without reading the
body. Archived with exactly the kit archive's model-config.yaml (workers, batchSize,
maxBatchDelay), served by the same TorchServe, it measures what TorchServe itself costs: the
HTTP frontend, the queue and batching, and the round trip to a Python worker. The kit's archive
can only approach this; `bench/serve_load.py` prints the kit's throughput as a fraction of it.
"""

ANSWER = '{"ok": true}'


class NoopHandler:
    def initialize(self, context) -> None:
        pass

    def handle(self, data: list, context) -> list:
        return [ANSWER] * len(data)
