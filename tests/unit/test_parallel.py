"""Sequence parallelism without Ray: the setting, the options the builder derives from it, which
sequences split on which backend, and the engine's per-step agreement (a fake peer group)."""

import pickle

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from serve_app.app import parallel_capacity_problem
from serve_app.config import AppArgs, ModelConfig, ParallelConfig
from serve_app.contract import APIError, GenerationCancelled, ReplicaUnavailable
from serve_app.engine import ImageEngine
from serve_app.jobs.failures import replica_lost
from serve_app.model import ImageModel
from serve_app.sequence_parallel import sequence_tokens, split_problem, uneven_splits
from tests.conftest import api_error, make_job


def test_the_degree_is_the_product_and_one_means_off():
    assert ParallelConfig().degree == 1
    assert ParallelConfig(ulysses=2, ring=2).degree == 4
    with pytest.raises(ValidationError, match="ulysses"):
        ParallelConfig(ulysses=0)


def test_parallel_and_cpu_offload_are_refused_together():
    with pytest.raises(ValidationError, match="cpu_offload"):
        ModelConfig(parallel={"ulysses": 2}, cpu_offload=True)


@pytest.mark.parametrize(
    ("device", "bundle"), [("cuda", {"CPU": 1, "GPU": 1}), ("cpu", {"CPU": 1})]
)
def test_the_builder_gives_one_bundle_per_rank_on_one_node(device, bundle):
    model = ModelConfig(
        id="m",
        source="tiny",
        device=device,
        parallel={"ulysses": 2, "ring": 2},
        speed={"attention_backend": "flash"},
    )
    options = ImageModel.deployment_options(AppArgs(models=[model]), model)
    assert options["placement_group_bundles"] == [bundle] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"].items() <= bundle.items() | {("num_cpus", 1)} | (
        {("num_gpus", 1)} if device == "cuda" else set()
    )
    single = ModelConfig(id="m", source="tiny", device=device)
    assert "placement_group_bundles" not in ImageModel.deployment_options(AppArgs(), single)


def test_a_cluster_without_a_node_that_fits_a_replica_is_named():
    model = ModelConfig(id="m", device="cuda", parallel={"ulysses": 4})
    options = ImageModel.deployment_options(AppArgs(models=[model]), model)
    two_gpu_nodes = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 2}}] * 3
    problem = parallel_capacity_problem(options, two_gpu_nodes)
    assert problem and "4 parallel ranks" in problem and "most GPUs on a node: 2" in problem
    eight = [{"Alive": True, "Resources": {"CPU": 16, "GPU": 8}}]
    assert parallel_capacity_problem(options, eight) is None
    dead_eight = [{"Alive": False, "Resources": {"CPU": 16, "GPU": 8}}]
    assert parallel_capacity_problem(options, dead_eight)


def test_ring_needs_an_attention_backend_that_returns_log_sum_exp():
    with pytest.raises(ValidationError, match=r"log-sum-exp.*the default \(native\)"):
        ModelConfig(parallel={"ring": 2})
    with pytest.raises(ValidationError, match="_native_math does not"):
        ModelConfig(parallel={"ring": 2}, speed={"attention_backend": "_native_math"})
    assert (
        ModelConfig(parallel={"ring": 2}, speed={"attention_backend": "flash"}).parallel.ring == 2
    )
    assert ModelConfig(parallel={"ulysses": 2}).parallel.degree == 2  # Ulysses: any backend


def test_the_sequence_counts_the_output_and_the_conditioning_canvas():
    assert sequence_tokens(make_job(width=80, height=112)) == 5 * 7
    canvas = Image.new("RGB", (512, 512))
    assert sequence_tokens(make_job(conditioning=(canvas,))) == 16 + 32 * 32


def test_gloo_refuses_a_sequence_that_does_not_split_evenly_nccl_takes_it():
    two = ParallelConfig(ulysses=2)
    assert split_problem(make_job(width=64, height=64), two, "cpu") is None
    problem = split_problem(make_job(width=80, height=112), two, "cpu")
    assert problem and "35 image tokens" in problem and "gloo" in problem
    assert split_problem(make_job(width=80, height=112), two, "cuda") is None  # ulysses_anything
    # Both kinds at once: no "anything" mode, even on NCCL.
    mixed = ParallelConfig(ulysses=2, ring=2)
    assert not uneven_splits(mixed, "nccl")
    assert split_problem(make_job(width=64, height=96), mixed, "cuda") is None  # 4 x 6 = 24
    assert split_problem(make_job(width=80, height=96), mixed, "cuda")  # 5 x 6 = 30


def test_the_engine_refuses_such_a_request_with_a_400_naming_size():
    engine = ImageEngine(ModelConfig(id="m", source="tiny", parallel={"ulysses": 2}))
    error = api_error(engine.check_request, make_job(width=80, height=112))
    assert (error.status, error.param) == (400, "size")
    ImageEngine(ModelConfig(id="m", source="tiny")).check_request(make_job(width=80, height=112))


def test_a_lost_rank_is_a_503_with_retry_after_that_jobs_retry():
    error = pickle.loads(pickle.dumps(ReplicaUnavailable("rank 1 died")))
    assert isinstance(error, ReplicaUnavailable)
    assert (error.status, error.code, error.headers) == (
        503,
        "model_unavailable",
        {"Retry-After": "5"},
    )
    assert replica_lost(error)
    assert not replica_lost(APIError("bad size", param="size"))


@pytest.fixture(scope="module")
def engine(tiny_cache_dir):
    engine = ImageEngine(ModelConfig(id="t", source="tiny", cache_dir=tiny_cache_dir))
    engine.load()
    return engine


class Peers:
    """Stands in for the other ranks: records each step's wish, answers with a scripted one."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.wishes: list[bool] = []
        self.stop_at = stop_at

    def __call__(self, stop: bool) -> bool:
        self.wishes.append(stop)
        return stop or len(self.wishes) - 1 == self.stop_at


def test_every_step_asks_the_group_and_a_group_stop_stops_the_call(engine):
    peers = Peers()
    engine.lockstep = peers
    try:
        request = make_job(steps=3)
        [[alone]] = engine.generate([request])
        assert peers.wishes == [False, False, False]
        peers = engine.lockstep = Peers(stop_at=1)
        with pytest.raises(GenerationCancelled):
            engine.generate([request])
        assert peers.wishes == [False, False]  # stopped after step 2 of 3, as the group decided
        engine.lockstep = Peers()
        [[again]] = engine.generate([request])
        assert np.array_equal(np.asarray(alone), np.asarray(again))
    finally:
        engine.lockstep = None


def test_a_failure_on_this_rank_is_agreed_as_a_stop_before_it_is_raised(engine):
    peers = engine.lockstep = Peers()

    def broken_preview(event):
        raise OSError("preview sink gone")

    request = make_job(steps=3, preview_steps=(1,), events=broken_preview)
    try:
        with pytest.raises(OSError, match="preview sink gone"):
            engine.generate([request])
        assert peers.wishes == [False, True]  # step 2's wish was to stop: every rank stopped
    finally:
        engine.lockstep = None


def test_a_peer_rank_denoises_without_decoding(engine):
    engine.lockstep = Peers()
    try:
        assert engine.generate([make_job(steps=2)], decode=False) == [[]]
    finally:
        engine.lockstep = None


class _CacheState:
    def __init__(self, previous):
        self.head_block_residual = previous

    def get_state(self):
        return self


class _LeaderHook:
    """What the first-block cache's decision reads: the state and the threshold."""

    def __init__(self, previous, threshold):
        self.state_manager = _CacheState(previous)
        self.threshold = threshold


def _cache_decisions(rank: int, address: str, results) -> None:
    """One rank of two (gloo): this rank's shard of the first block's residuals."""
    import torch
    import torch.distributed as dist
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    from serve_app.sequence_parallel import _decide_on_all_ranks

    dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=rank, world_size=2)
    try:
        previous = torch.ones(10)
        residual = previous * (1.5 if rank == 0 else 1.01)  # changed 50% here, 1% there
        hook = _LeaderHook(previous, threshold=0.2)
        alone = FBCHeadBlockHook._should_compute_remaining_blocks(hook, residual)
        results.put((rank, alone, _decide_on_all_ranks(hook, residual)))
    finally:
        dist.destroy_process_group()


def test_the_cache_decides_on_the_whole_sequence_so_ranks_cannot_part_ways():
    """diffusers' own decision on each shard differs between the ranks (one would skip the
    blocks and their collectives, the other wait in them); the agreed one is the same on both
    and is the whole sequence's: (5 + 0.1) / (10 + 10) = 0.255 > 0.2, compute."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    context = mp.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_cache_decisions, args=(r, address, results)) for r in (0, 1)]
    for process in ranks:
        process.start()
    decisions = dict(
        (rank, (alone, agreed))
        for rank, alone, agreed in [results.get(timeout=60), results.get(timeout=60)]
    )
    for process in ranks:
        process.join(timeout=30)
    assert decisions[0][0] is True and decisions[1][0] is False  # per shard: they part ways
    assert decisions[0][1] is decisions[1][1] is True
