"""Sequence parallelism for the families whose transformer diffusers gives a context-parallel
plan and whose text is padded to a fixed length: FLUX.1 [dev] (`flux`) and FLUX.2 [klein]
(`flux2-klein`). Two ranks (spawned processes, gloo), each loading the family's tiny model and
joining the group as a Serve replica's ranks do (`parallel._rank_engine`), against one engine on
its own: the same images within the batched tolerance. No Ray (the replica's side is
tests/integration/test_parallel.py, with the Kontext model)."""

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import ModelConfig
from serve_app.contract import APIError
from serve_app.engine import ImageEngine
from serve_app.families import FAMILIES
from tests.conftest import assert_batch_equivalent, make_job


def _config(family: str, cache_dir: str, ulysses: int = 1) -> ModelConfig:
    return ModelConfig(
        id="p", family=family, source="tiny", cache_dir=cache_dir, parallel={"ulysses": ulysses}
    )


def _rank(rank: int, address: str, family: str, cache_dir: str, jobs, results) -> None:
    """One rank: join, load, run every job in lockstep; rank 0 decodes and reports."""
    from serve_app.parallel import _rank_engine
    from serve_app.sequence_parallel import leave_group

    torch.set_num_threads(1)
    try:
        engine = _rank_engine(_config(family, cache_dir, ulysses=2), address, rank)
        for job in jobs:
            images = engine.generate([job], decode=rank == 0)
            if rank == 0:
                results.put([np.asarray(image, np.int16) for image in images[0]])
    except BaseException as exc:
        results.put(repr(exc))
        raise
    finally:
        leave_group()


def _two_ranks(family: str, cache_dir: str, jobs) -> list:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    context = mp.get_context("spawn")
    results = context.Queue()
    ranks = [
        context.Process(target=_rank, args=(rank, address, family, cache_dir, jobs, results))
        for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    try:
        answers = [results.get(timeout=300) for _ in jobs]
    finally:
        for process in ranks:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    for answer in answers:
        assert not isinstance(answer, str), answer
    return answers


def halves(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, "red")
    image.paste("blue", (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.mark.parametrize(
    ("family", "edit_fields"),
    [
        # FLUX.1 [dev] edits by image-to-image: its input never joins the sequence, so an input
        # of 35 tokens (80x112) splits fine on gloo beside a 64x64 output.
        ("flux", {"conditioning": (halves((80, 112)),), "guidance": 3.5}),
        # FLUX.2 [klein] appends its reference's tokens (16 + 16 here).
        ("flux2-klein", {"conditioning": (halves(),), "guidance": 1.0}),
    ],
)
def test_two_ranks_make_the_images_one_engine_makes(family, edit_fields, tmp_path):
    cache_dir = str(tmp_path)
    torch.set_num_threads(2)
    alone = ImageEngine(_config(family, cache_dir))
    alone.load()  # builds and saves the tiny model the ranks then load
    guidance = edit_fields["guidance"]
    jobs = [
        make_job(request_id="t2i", steps=3, guidance=guidance, seeds=(1, 2)),
        make_job(request_id="edit", steps=3, prompt="make it blue", **edit_fields),
    ]
    parallel = _two_ranks(family, cache_dir, jobs)
    for job, images in zip(jobs, parallel, strict=True):
        expected = [np.asarray(image, np.int16) for image in alone.generate([job])[0]]
        assert len(images) == len(expected) == job.n
        for one, other in zip(images, expected, strict=True):
            assert_batch_equivalent(one, other)
    assert (parallel[0][0] != parallel[0][1]).mean() > 0.2  # two seeds, two images


def test_the_split_check_counts_the_input_only_where_it_joins_the_sequence(tmp_path):
    """On gloo a sequence must split evenly: a Kontext edit counts its canvas's tokens (16 +
    35, refused naming size), a FLUX.1 [dev] edit only its output's (16, served)."""
    edit = make_job(conditioning=(halves((80, 112)),))

    def check(family: str) -> None:
        engine = ImageEngine(_config(family, str(tmp_path), ulysses=2))
        engine.check_request(edit)

    with pytest.raises(APIError) as refused:
        check("flux-kontext")
    assert refused.value.param == "size" and "51 image tokens" in str(refused.value)
    check("flux")


def test_families_without_a_tested_split_are_refused_naming_why():
    assert {name for name, f in FAMILIES.items() if f.context_parallel} == {
        "flux-kontext", "flux", "flux2-klein"
    }  # fmt: skip
    with pytest.raises(ValueError, match="unpadded text") as refused:
        ModelConfig(id="q", family="qwen-image-edit", parallel={"ulysses": 2})
    assert "flux-kontext, flux, flux2-klein" in str(refused.value)
