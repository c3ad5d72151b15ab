"""Asynchronous jobs: submit millions of inputs, let any number of workers on any number of machines
recognize them, fetch the records later. See :mod:`wanwu.jobs.base` for the model of a job."""

from __future__ import annotations

from wanwu.jobs.base import (
    JobInput,
    JobQueue,
    JobSpec,
    JobStatus,
    Task,
    UnknownJobError,
    default_queue_url,
    open_queue,
    register_queue,
)
from wanwu.jobs.inputs import job_inputs

__all__ = [
    "JobInput",
    "JobQueue",
    "JobSpec",
    "JobStatus",
    "Task",
    "UnknownJobError",
    "default_queue_url",
    "job_inputs",
    "open_queue",
    "register_queue",
]
