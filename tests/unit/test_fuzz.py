"""Property tests of image decoding and normalization (Hypothesis): arbitrary bytes and mutated valid PNG, JPEG,
GIF, WebP, TIFF and BMP images give the right tensor or a ClientError with a 4xx, never another
exception, each within a few seconds; and every input the coverage-guided fuzzer (`make fuzz`)
kept in tests/fuzz_corpus/ still does."""

from __future__ import annotations

import struct
from datetime import timedelta

import pytest
from fuzzing import check, corpus, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on corrupt metadata
SEEDS = seeds()
BOUNDED = settings(deadline=timedelta(seconds=5),  # per input: a hang fails; generous for a contended machine
                   suppress_health_check=[HealthCheck.too_slow], database=None)


def bounded(examples: int):
    return settings(BOUNDED, max_examples=examples)


@st.composite
def mutated_images(draw) -> bytes:
    """A valid seed image with 1-8 mutations: bit flips, boundary bytes, 32-bit fields set to
    extreme values (sizes, lengths, offsets), truncation, insertion, deletion, duplication."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "byte", "field", "truncate", "insert", "delete", "duplicate"]))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[position] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]))
        elif kind == "field":
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 100_000]))
            data[position:position + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del data[position:position + draw(st.integers(1, 32))]
        else:
            data[position:position] = data[position:position + draw(st.integers(1, 64))]
    return bytes(data)


@bounded(300)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_give_a_tensor_or_a_bad_image(data):
    check(data)


@bounded(300)
@given(st.sampled_from(sorted(SEEDS)).map(SEEDS.get).flatmap(
    lambda seed: st.just(seed) | st.binary(max_size=64).map(lambda prefix: prefix + seed[8:])))
def test_valid_images_and_foreign_headers_give_a_tensor_or_a_bad_image(data):
    check(data)


@bounded(600)
@given(mutated_images())
def test_mutated_images_give_a_tensor_or_a_bad_image(data):
    check(data)


def test_every_seed_is_a_valid_image():
    from fuzzing import CLASSIFIERS

    from handlers.pipeline import image_pixels

    for name, data in SEEDS.items():
        for model in CLASSIFIERS:
            assert image_pixels(data, model).shape[1:] == (28, 28), name


@pytest.mark.parametrize("name", sorted(corpus()) or ["(empty)"])
def test_inputs_the_fuzzer_found_still_give_a_tensor_or_a_bad_image(name):
    found = corpus()
    if not found:
        pytest.skip("tests/fuzz_corpus/ is empty: run make fuzz")
    check(found[name])
