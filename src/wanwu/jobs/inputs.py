"""What a job's inputs become on the queue: files, folders, globs, URLs and ``s3://`` prefixes, expanded
exactly as ``wanwu recognize`` expands them, each turned into a :class:`~wanwu.jobs.base.JobInput`.

Lazy: a folder of a million files is walked and read one file at a time. An input that cannot be expanded or
read (a missing path, a glob matching nothing, a file above ``max_bytes``) comes out as a ``missing`` input
carrying the reason, never silently dropped; the caller decides whether to queue it or to refuse it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from wanwu.errors import InputError
from wanwu.fetch import Fetcher
from wanwu.jobs.base import JobInput
from wanwu.sources import DEFAULT_MAX_BYTES, InputItem, SourceOptions, expand


def job_inputs(
    args: Iterable[str], *, by_reference: bool = False, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[JobInput]:
    """One job input per expanded input. Local files and objects are uploaded (their bytes read now) unless
    ``by_reference``, which sends local files as absolute paths for workers that may read them; URLs are
    fetched by the workers. A WebDataset shard is read here: each image sample is one uploaded input named
    ``SHARD#MEMBER`` (so a job's tasks are ranges of samples, like any uploads)."""
    fetcher = Fetcher(max_bytes)
    for item in expand(args, options=SourceOptions(max_bytes=max_bytes)):
        yield job_input(item, fetcher, by_reference)


def job_input(item: InputItem, fetcher: Fetcher, by_reference: bool = False) -> JobInput:
    if item.kind in ("url", "missing"):
        return JobInput.by_reference(item)
    if by_reference and item.kind == "file":
        return JobInput.by_reference(replace(item, locator=str(Path(item.locator).absolute())))
    # an object or a shard's sample has no path a worker could read: upload it
    try:
        return JobInput.upload(item.input, fetcher.fetch(item).data)
    except InputError as e:
        return JobInput.missing(item.input, e.type, str(e))
