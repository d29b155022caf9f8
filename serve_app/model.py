"""The model deployment: owns one engine, batches jobs with `@serve.batch`, encodes results.

A plain class; `serve_app.app` turns it into a deployment with options from config. Flow per
request: check the prompt fits the text context (before batching, so a bad request never joins a
batch) -> split into chunks that fit a batch -> `@serve.batch` collects chunks from many requests,
counting images -> compatible groups run as one pipeline call each, off the event loop -> the
request encodes its own images off the event loop while the next batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve

from serve_app.batching import ImageJob, check_batch_output, count_images, group_jobs, split_job
from serve_app.codec import encode_image
from serve_app.config import BatchingConfig, ModelConfig
from serve_app.protocol import APIError

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCHING = BatchingConfig()


@dataclass
class GenerationResult:
    """Encoded images in seed order, plus what the response's `usage` needs."""

    images: list[bytes]
    text_tokens: int
    batch_sizes: list[int]  # images in each batch this request's chunks ran in (observability)


def _default_engine_cls():
    from serve_app.engine import FluxEngine

    return FluxEngine


def _torch_threads(config: ModelConfig) -> int:
    """Threads for torch: configured, else the CPUs Ray assigned to this replica."""
    if config.torch_threads:
        return config.torch_threads
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # noqa: BLE001 - outside Ray
        cpus = 0
    return max(1, round(cpus)) if cpus else max(1, os.cpu_count() or 1)


class ImageModel:
    """One replica of one model. `engine_cls` is injectable so unit tests can run without Ray."""

    def __init__(self, model_config: dict | ModelConfig, engine_cls: Any = None) -> None:
        self.config = ModelConfig.model_validate(model_config)
        import torch

        torch.set_num_threads(_torch_threads(self.config))
        self.engine = (engine_cls or _default_engine_cls())(self.config)
        self.engine.load()
        if self.config.warmup:
            self.engine.warmup()
        # The pipeline is not thread-safe: one worker runs every call in order.
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._max_batch_images = _DEFAULT_BATCHING.max_batch_images
        logger.info(
            "ImageModel %s ready with %d torch threads", self.config.id, torch.get_num_threads()
        )

    def reconfigure(self, user_config: dict) -> None:
        """Apply batching knobs from the deployment's `user_config` (live, no restart)."""
        batching = BatchingConfig.model_validate(user_config or {})
        self._max_batch_images = batching.max_batch_images
        self._run_batch.set_max_batch_size(batching.max_batch_images)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        logger.info("ImageModel %s batching: %s", self.config.id, batching.model_dump())

    def check_health(self) -> None:
        if not self.engine.loaded:
            raise RuntimeError(f"model {self.config.id} is not loaded")

    def count_text_tokens(self, prompt: str) -> int:
        tokens = self.engine.count_text_tokens(prompt)
        limit = self.config.max_sequence_length
        if tokens > limit:
            raise APIError(
                f"The prompt is {tokens} tokens long; model {self.config.id!r} accepts at most "
                f"{limit} text tokens. Shorten the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        return tokens

    async def generate(self, job: ImageJob) -> GenerationResult:
        """Generate and encode every image of one request."""
        text_tokens = self.count_text_tokens(job.prompt)
        chunks = split_job(job, self._max_batch_images)
        outcomes = await asyncio.gather(*(self._run_batch(chunk) for chunk in chunks))
        images, batch_sizes = [], []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            chunk_images, batch_size = outcome
            images.extend(chunk_images)
            batch_sizes.append(batch_size)
        encoded = await asyncio.to_thread(
            lambda: [encode_image(im, job.output_format, job.output_compression) for im in images]
        )
        return GenerationResult(images=encoded, text_tokens=text_tokens, batch_sizes=batch_sizes)

    @serve.batch(
        max_batch_size=_DEFAULT_BATCHING.max_batch_images,
        batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s,
        batch_size_fn=count_images,
    )
    async def _run_batch(self, jobs: list[ImageJob]) -> list[Any]:
        return await self.run_jobs(jobs)

    async def run_jobs(self, jobs: list[ImageJob]) -> list[Any]:
        """One batch: each compatible group is one pipeline call; a failing group fails alone.

        Returns, per job, `(images, images_in_batch)` or the exception its group raised.
        """
        batch_images = count_images(jobs)
        groups = group_jobs(jobs)
        results: list[Any] = [None] * len(jobs)
        loop = asyncio.get_running_loop()
        for group in groups:
            members = [jobs[i] for i in group]
            try:
                outputs = await loop.run_in_executor(
                    self._pipeline_thread, self.engine.generate, members
                )
            except Exception as exc:  # noqa: BLE001 - reported to the group's requests only
                logger.exception(
                    "pipeline call failed for requests %s", [job.request_id for job in members]
                )
                outputs = [exc] * len(members)
            for index, output in zip(group, outputs, strict=True):
                failed = isinstance(output, BaseException)
                results[index] = output if failed else (output, batch_images)
        logger.info(
            "batch of %d images from %d requests ran as %d pipeline call(s)",
            batch_images,
            len(jobs),
            len(groups),
        )
        check_batch_output(jobs, results)
        return results
