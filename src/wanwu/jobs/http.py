"""``/v1/jobs`` over HTTP: a FastAPI router the service mounts (``app.include_router(router(queue))``).

* ``POST /v1/jobs`` — JSON ``{"inputs": [URL or absolute path, ...], "top_k": 5, "score": "softmax",
  "threshold": null, "task_size": 16}``, or multipart with ``files`` (uploads, repeatable), optional
  ``inputs`` (URLs/paths, repeatable) and the same options as form fields. 201 with the job's status.
* ``GET /v1/jobs`` — recent jobs · ``GET /v1/jobs/{id}`` — status (404 if unknown).
* ``GET /v1/jobs/{id}/results?format=jsonl|csv|json`` — records so far in input order, streamed.
* ``POST /v1/jobs/{id}/cancel`` — stop the job (records so far stay); returns the status.
* ``DELETE /v1/jobs/{id}`` — forget the job: status, records and uploads (cancelling it first).

Paths are only ever read by workers, and only under their ``--allow-root`` folders; a folder is refused
(``wanwu jobs submit`` expands folders on the caller's side). Ids are only ever those the queue issued.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime, and
# they name classes imported inside router() (fastapi is an optional extra).
import io
import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from wanwu.errors import MissingExtraError, QueueError, QueueStorageError, QueueUnavailableError, UsageError
from wanwu.jobs.base import (
    JobInput,
    JobQueue,
    JobSpec,
    UnknownJobError,
    default_queue_url,
    open_queue,
    parse_queue_url,
    with_english,
)
from wanwu.records import RecordOptions
from wanwu.sinks import SinkOptions, create_sink
from wanwu.sources import DEFAULT_MAX_BYTES

if TYPE_CHECKING:
    from fastapi import APIRouter

log = logging.getLogger("wanwu")
RETRY_AFTER_S = 5  # what a 503 for an unreachable queue asks callers to wait
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8", "json": "application/json"}
MAX_JSON_INPUTS = 1_000_000
_OPTION_PROPERTIES: dict[str, Any] = {
    "top_k": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
    "score": {"type": "string", "enum": ["softmax", "logit"], "default": "softmax"},
    "threshold": {"type": ["number", "null"], "description": "drop predictions scoring below this"},
    "task_size": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 16,
                  "description": "inputs per task (the unit a worker claims)"},
}
_INPUT = {"type": "string", "pattern": "^(https?://[^\\u0000]+|/[^\\u0000]*[^/\\u0000])$",
          "description": "an http(s) URL or the absolute path of a file (not a folder: `wanwu jobs submit` "
                         "expands folders on the caller's side); no NUL byte"}
SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["inputs"], "additionalProperties": False,
                "properties": {"inputs": {"type": "array", "minItems": 1, "items": _INPUT}, **_OPTION_PROPERTIES},
            }},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {
                    "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
                    "inputs": {"type": "array", "items": _INPUT}, **_OPTION_PROPERTIES,
                    "threshold": {"type": "number", "description": "drop predictions scoring below this"},
                },
            }},
        },
    }
}
_ERROR: dict[str, Any] = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "properties": {"code": {"type": "string"},
                                                           "message": {"type": "string"}}}},
}}}}
_400: dict[int | str, dict[str, Any]] = {400: {"description": "Invalid job (bad input, option or body)", **_ERROR}}
_404: dict[int | str, dict[str, Any]] = {404: {"description": "No such job", **_ERROR}}
_503: dict[int | str, dict[str, Any]] = {503: {"description": "The queue cannot be reached", **_ERROR}}
_507: dict[int | str, dict[str, Any]] = {507: {"description": "The queue's upload budget is spent", **_ERROR}}
_RECORD_ARRAY = {"type": "array", "items": {"type": "object"}}
_JOB_ID = {"job_id": "$response.body#/id"}
# The operations a submitted job's id leads to (OpenAPI links: clients and Schemathesis' stateful phase).
_CREATED: dict[int | str, dict[str, Any]] = {201: {"description": "The job, queued", "links": {
    name: {"operationId": op, "parameters": _JOB_ID} for name, op in (
        ("GetJob", "jobs_status"), ("GetResults", "jobs_results"), ("CancelJob", "jobs_cancel"),
        ("DeleteJob", "jobs_delete"))}}}


def router(queue: JobQueue | str | None = None, *, max_upload_bytes: int = DEFAULT_MAX_BYTES) -> "APIRouter":
    """The ``/v1/jobs`` routes over ``queue`` (a queue, or its URL; default: the default queue)."""
    try:
        from fastapi import APIRouter, HTTPException, Query, Request
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError:
        raise MissingExtraError("fastapi", "server", "the jobs HTTP API") from None

    q = _Queue(queue)
    api = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    def http_error(e: Exception) -> HTTPException:
        if isinstance(e, UnknownJobError):
            return HTTPException(404, str(e))
        if isinstance(e, UsageError):
            return HTTPException(400, str(e))
        if isinstance(e, QueueStorageError):
            return HTTPException(507, str(e))
        if isinstance(e, QueueUnavailableError):
            return HTTPException(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)})
        return HTTPException(503, str(e))

    @api.post("", status_code=201, openapi_extra=SUBMIT_BODY, operation_id="jobs_submit",
              responses={**_CREATED, **_400, **_503, **_507})
    async def submit(request: Request) -> JSONResponse:
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                spec = await _multipart_spec(request, max_upload_bytes)
            else:  # a body of a million inputs takes seconds to check: off the event loop
                spec = await run_in_threadpool(_json_spec, await _json_body(request))
            opened = await run_in_threadpool(q)
            job_id = await run_in_threadpool(opened.submit, spec)
            status = await run_in_threadpool(opened.status, job_id)
        except (UsageError, QueueError) as e:
            raise http_error(e) from None
        return JSONResponse(status.to_dict(), status_code=201, headers={"Location": f"/v1/jobs/{job_id}"})

    @api.get("", responses=_503, operation_id="jobs_list")
    def list_jobs(limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
        try:
            return [s.to_dict() for s in q().jobs(limit)]
        except QueueError as e:
            raise http_error(e) from None

    @api.get("/{job_id}", responses={**_404, **_503}, operation_id="jobs_status")
    def status(job_id: str) -> dict[str, Any]:
        try:
            return q().status(job_id).to_dict()
        except QueueError as e:
            raise http_error(e) from None

    @api.get("/{job_id}/results", responses={
        200: {"description": "Records in input order", "content": {
            t.split(";")[0]: {"schema": _RECORD_ARRAY if f == "json" else {"type": "string"}}
            for f, t in MEDIA_TYPES.items()}},
        **_404, **_503}, operation_id="jobs_results")
    def results(job_id: str, format: str = Query("jsonl", pattern="^(jsonl|csv|json)$"),
                bom: bool = False) -> StreamingResponse:
        try:
            top_k = q().status(job_id).options.top_k
            english, records = with_english(q().results(job_id))
        except QueueError as e:
            raise http_error(e) from None
        body = _stream(records, format, SinkOptions(top_k=top_k, bom=bom, english=english))
        filename = f"{job_id}.{format}"
        return StreamingResponse(body, media_type=MEDIA_TYPES[format],
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @api.post("/{job_id}/cancel", responses={**_404, **_503}, operation_id="jobs_cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        """Stop the job: no worker starts any more of its tasks; records already written stay."""
        try:
            return q().cancel(job_id).to_dict()
        except QueueError as e:
            raise http_error(e) from None

    @api.delete("/{job_id}", status_code=204, responses={**_404, **_503}, operation_id="jobs_delete")
    def delete(job_id: str) -> Response:
        """Forget the job (cancelling it first): its status, records and uploads."""
        try:
            q().delete(job_id)
        except QueueError as e:
            raise http_error(e) from None
        return Response(status_code=204)

    return api


class _Queue:
    """The router's queue, opened on first use when it could not be at start-up: a service whose queue is
    briefly down starts anyway and answers 503 (with Retry-After) until the queue is back. A bad URL, or a
    queue that refuses us (a wrong password), still fails at start-up."""

    def __init__(self, queue: JobQueue | str | None) -> None:
        self._lock = threading.Lock()
        self._queue: JobQueue | None = None
        if queue is not None and not isinstance(queue, str):
            self._queue = queue
            return
        self._url = queue
        parse_queue_url(queue or default_queue_url())  # UsageError now for a URL that can never work
        try:
            self._queue = open_queue(queue)
        except QueueUnavailableError as e:
            log.warning("the job queue is not reachable yet (%s): /v1/jobs answers 503 until it is", e)

    def __call__(self) -> JobQueue:
        with self._lock:
            if self._queue is None:
                self._queue = open_queue(self._url)
            return self._queue


def _stream(records: Iterator[Any], fmt: str, options: SinkOptions) -> Iterator[str]:
    """Render records through the CLI's sinks, a few hundred at a time."""
    buffer = io.StringIO()
    sink = create_sink(fmt, buffer, options)
    for n, record in enumerate(records, 1):
        sink.write(record)
        if n % 256 == 0:
            yield _drain(buffer)
    sink.close()
    yield _drain(buffer)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


async def _json_body(request: Any) -> dict[str, Any]:
    from wanwu.service.guard import read_json  # 400 for bad JSON, a NUL or lone surrogate, absurd nesting

    body = await read_json(request)
    if not isinstance(body, dict):
        raise UsageError('send a JSON object like {"inputs": ["https://…/a.jpg"], "top_k": 5}, '
                         "or multipart form data with files")
    return body


def _options(data: Any) -> tuple[RecordOptions, int]:
    def number(key: str, kind: type[int] | type[float], default: Any) -> Any:
        value = data.get(key)
        if value in (None, ""):
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{key} must be a number, got {value!r}") from None

    score: Any = data.get("score") or "softmax"
    options = RecordOptions(number("top_k", int, 5), score, number("threshold", float, None))
    return options, number("task_size", int, 16)


def _json_spec(body: dict[str, Any]) -> JobSpec:
    unknown = set(body) - {"inputs", *_OPTION_PROPERTIES}
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(sorted(unknown))}")
    for key in ("top_k", "task_size"):  # JSON is typed: no "5" or true where an integer belongs (5.0 is one)
        value = body.get(key, 0)
        if isinstance(value, float) and value.is_integer():
            body[key] = int(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{key} must be an integer")
    if body.get("threshold") is not None and (
            isinstance(body["threshold"], bool) or not isinstance(body["threshold"], int | float)):
        raise UsageError("threshold must be a number")
    if "score" in body and not isinstance(body["score"], str):
        raise UsageError("score must be 'softmax' or 'logit'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise UsageError('"inputs" must be a non-empty list of URLs or absolute paths')
    if len(inputs) > MAX_JSON_INPUTS:
        raise UsageError(f"at most {MAX_JSON_INPUTS:,} inputs per request; split the job")
    options, task_size = _options(body)
    return JobSpec([_parse_input(i) for i in inputs], options, task_size)


def _parse_input(text: str) -> JobInput:
    """A URL or an absolute path from a caller: no NUL byte, no lone surrogate, no folder."""
    if "\x00" in text:
        raise UsageError(f"input {text.encode('unicode_escape').decode()!r}: a NUL byte is not allowed")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("an input holds a lone surrogate (not valid Unicode text)") from None
    item = JobInput.parse(text)
    if item.kind == "path" and (text.endswith("/") or os.path.isdir(text)):
        raise UsageError(f"{text!r} is a folder: a job takes files and URLs; expand folders on your side with "
                         "`wanwu jobs submit FOLDER` (it queues each image under it)")
    return item


async def _multipart_spec(request: Any, max_bytes: int) -> JobSpec:
    from wanwu.service.guard import check_form

    async with request.form() as form:  # closes the spooled upload files
        check_form(form)  # 400 for a NUL or lone surrogate in a field or a file name
        inputs: list[JobInput] = [_parse_input(str(i)) for i in form.getlist("inputs")]
        for upload in form.getlist("files"):
            if isinstance(upload, str):
                raise UsageError('"files" must be file parts')
            # what the parser counted, and a byte more (never max_bytes + 1 at once: an upload above 1 MB is a
            # spooled file on disk, whose read allocates all it is asked for before reading)
            size = max_bytes if upload.size is None else min(upload.size, max_bytes)
            data = await upload.read(size + 1)
            name = upload.filename or f"upload-{len(inputs)}"
            if len(data) > max_bytes:
                message = f"upload above the limit of {max_bytes:,} bytes"
                inputs.append(JobInput.missing(name, "too_large", message))
            else:
                inputs.append(JobInput.upload(name, data))
        options, task_size = _options(form)
    if not inputs:
        raise UsageError('send files (multipart field "files") or URLs (field "inputs")')
    return JobSpec(inputs, options, task_size)
