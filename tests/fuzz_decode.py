"""Coverage-guided fuzzing of image decoding and normalization with atheris (libFuzzer for Python).

Starts from the seed images of tests/fuzzing.py and the inputs kept in tests/fuzz_corpus/, mutates
them guided by coverage of the kit's and Pillow's Python code, and checks the property of
tests/fuzzing.py on every input. Inputs that reach new code are added to tests/fuzz_corpus/ (named
by their SHA-1); an input that breaks the property (another exception, more than 5 s, more than
2 GB) is written there as crash-*, timeout-* or oom-* and the run stops: fix the code, keep the
file. tests/unit/test_fuzz.py replays every file there in each `make test`.

Run: make fuzz [FUZZ_SECONDS=300]   (bounded by -max_total_time)
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from fuzzing import CORPUS, check, seeds  # noqa: E402

atheris.instrument_all()  # coverage of the kit's and Pillow's Python code (Pillow's codecs are C)

warnings.simplefilter("ignore")  # Pillow warns about corrupt metadata; the property is what matters


def main() -> int:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as work:
        for name, data in seeds().items():
            (Path(work) / name).write_bytes(data)
        # the first folder receives what is new; the seeds are only read
        atheris.Setup([sys.argv[0], str(CORPUS), work, f"-max_total_time={seconds}", "-timeout=5", "-rss_limit_mb=2048",
                       "-max_len=65536", f"-artifact_prefix={CORPUS}/", "-print_final_stats=1"], check)
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
