"""Objects the pipeline thread uses are never used by another thread at the same time.

The prompt-length check runs on Serve's threads while the pipeline thread tokenizes a call's
prompts. A fast tokenizer keeps truncation and padding as state on its Rust backend, so a check
that used the pipeline's tokenizer could switch padding off between the pipeline setting it and
encoding: the call then ran on unpadded text (wrong images, or a failed call). These tests stop
the pipeline exactly there, run the check, and let the pipeline go on.
"""

import threading

import numpy as np
import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.engine import ImageEngine
from tests.conftest import make_job


@pytest.fixture(scope="module")
def engine(tiny_cache_dir):
    torch.set_num_threads(2)
    engine = ImageEngine(ModelConfig(id="tiny", source="tiny", cache_dir=tiny_cache_dir))
    engine.load()
    return engine


class PausingBackend:
    """The pipeline tokenizer's Rust backend, paused once inside the pipeline's padded T5
    tokenization (padding already set, nothing encoded yet) until the test says go."""

    def __init__(self, real, padded_length: int) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_length", padded_length)
        object.__setattr__(self, "inside", threading.Event())
        object.__setattr__(self, "go", threading.Event())

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        setattr(self._real, name, value)

    def encode_batch(self, *args, **kwargs):
        padding = self._real.padding
        if not self.inside.is_set() and padding and padding.get("length") == self._length:
            self.inside.set()
            assert self.go.wait(30), "the test never let the pipeline go on"
        return self._real.encode_batch(*args, **kwargs)


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image).astype(np.int16) for image in images[0]]


def test_a_token_count_in_the_middle_of_a_call_leaves_its_tokenization_alone(engine):
    job = make_job(prompt="a lighthouse at dawn", seeds=(3,))
    alone = pixels(engine.generate([job]))
    tokenizer = engine.pipe.tokenizer_2
    real = tokenizer._tokenizer
    paused = PausingBackend(real, engine.config.max_sequence_length)
    outcome: dict = {}

    def run_call() -> None:
        try:
            outcome["images"] = pixels(engine.generate([job]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    tokenizer._tokenizer = paused
    try:
        call = threading.Thread(target=run_call)
        call.start()
        assert paused.inside.wait(60), "the pipeline never tokenized its prompt"
        counted = engine.count_text_tokens("a much longer prompt about a lighthouse at dawn")
        paused.go.set()
        call.join(120)
    finally:
        tokenizer._tokenizer = real
        paused.go.set()
    assert "error" not in outcome, f"the call failed: {outcome.get('error')!r}"
    assert counted == engine.count_text_tokens("a much longer prompt about a lighthouse at dawn")
    for during, before in zip(outcome["images"], alone, strict=True):
        assert np.array_equal(during, before), "the call ran with the check's tokenizer settings"


def test_token_counts_from_many_threads_agree_with_one_thread(engine):
    prompts = [f"prompt number {i} " + "word " * (i % 40) for i in range(64)]
    expected = [engine.count_text_tokens(prompt) for prompt in prompts]
    results: dict[int, int] = {}

    def count(index: int) -> None:
        for _ in range(20):
            results[index] = engine.count_text_tokens(prompts[index])

    threads = [threading.Thread(target=count, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(prompts))] == expected


def test_calls_beside_a_stream_of_token_counts_equal_the_same_calls_alone(engine):
    """Statistical: a thread counts tokens without pause while calls run; each call equals
    the same call alone (one-image calls: bit-identical)."""
    jobs = [make_job(prompt=f"a cat number {i}", seeds=(i,)) for i in range(6)]
    alone = [pixels(engine.generate([job])) for job in jobs]
    stop = threading.Event()
    counts = []

    def hammer() -> None:
        while not stop.is_set():
            counts.append(engine.count_text_tokens("a quick brown fox " * 8))

    counter = threading.Thread(target=hammer)
    counter.start()
    try:
        during = [pixels(engine.generate([job])) for job in jobs]
    finally:
        stop.set()
        counter.join()
    assert len(counts) > 10 and len(set(counts)) == 1
    for i, (got, want) in enumerate(zip(during, alone, strict=True)):
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), f"call {i}"
