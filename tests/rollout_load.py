"""Clients that keep sending real test images to /predictions/<model> while versions change (make rollout,
make rollback), and the checks on what they got: every request answered 200, every answer equal to what
export recorded for the version that gave it, and each client seeing the versions switch in order."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import urllib.parse
from pathlib import Path

from handlers.archive import read_archive

CLIENTS = 32
MAX_REQUESTS = 20_000  # per client: the load stops there even if nobody stops it


def recorded_samples(archive: Path) -> list[tuple[bytes, list[float]]]:
    """(PNG, probabilities) of the test images export recorded in the archive's release.json."""
    return [(base64.b64decode(s["png"]), s["probabilities"]) for s in read_archive(archive).release["samples"]]


class Load:
    """CLIENTS threads, each sending `images` in turn to /predictions/<model> over one connection until stopped,
    recording (status, image index, answer) in order."""

    def __init__(self, inference: str, model: str, images: list[bytes]):
        self.address, self.model = urllib.parse.urlsplit(inference), model
        self.images, self.stopped = images, threading.Event()
        self.answers: list[list[tuple]] = [[] for _ in range(CLIENTS)]
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(CLIENTS)]

    def client(self, index: int) -> None:
        connection = http.client.HTTPConnection(self.address.hostname, self.address.port, timeout=60)
        for sent in range(MAX_REQUESTS):
            if self.stopped.is_set():
                break
            image = sent % len(self.images)
            try:
                connection.request("POST", f"/predictions/{self.model}", self.images[image],
                                   {"Content-Type": "application/octet-stream"})
                response = connection.getresponse()
                body = response.read()
                answer = json.loads(body) if response.status == 200 else body
                self.answers[index].append((response.status, image, answer))
            except OSError as error:
                self.answers[index].append((None, image, repr(error)))
                connection.close()
        connection.close()

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def check(self, expected: dict[str, list[list[float]]], first: str, second: str) -> int:
        """Asserts what a rollout first -> second and the rollback after it must give; the requests answered."""
        total = sum(len(answers) for answers in self.answers)
        failed = [a for answers in self.answers for a in answers if a[0] != 200]
        assert total > CLIENTS * 10 and failed == [], failed[:5]
        for answers in self.answers:
            switches = [answers[0][2]["model_version"]]
            for _, image, answer in answers:
                version = answer["model_version"]
                served = list(answer["probabilities"].values())
                assert max(abs(a - b) for a, b in zip(served, expected[version][image])) <= 1e-5
                if version != switches[-1]:
                    switches.append(version)
            assert switches in ([first, second, first], [first, second], [second, first], [first]), switches
        seen = {answer[2]["model_version"] for answers in self.answers for answer in answers}
        assert second in seen and self.answers[0][-1][2]["model_version"] == first
        return total
