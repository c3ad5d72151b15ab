"""Bytes the service holds for callers: request bodies and URL downloads, under one in-flight budget.

* :class:`ByteBudget` — ``--max-inflight-mb``: the bytes of every request body and every URL download held
  at once, all requests together. Thread-safe (bodies are counted on the event loop, downloads on fetch
  threads).
* :class:`BodyLimitMiddleware` — each body at most ``--max-upload-mb`` (413; a larger Content-Length is
  refused before a byte is read). Bytes are counted as they arrive, never reserved from what a caller
  declares: a connection holds what it has sent, so callers that declare 50 MB and send nothing hold nothing.
  A body must keep up a minimum rate: it may take ``body_timeout_s`` plus one second per ``min_rate`` bytes
  received (Apache's mod_reqtimeout rule); a caller that falls behind gets 408 and its bytes are released.
  When the budget is spent, the request gets 503 + Retry-After. Bytes stay counted until the response is
  sent, since the body (and what was decoded from it) is held that long.
* :class:`BudgetedFetcher` — the orchestrator's fetcher, with every downloaded chunk counted against the same
  budget until its request ends; a download that finds the budget spent becomes that input's error record.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wanwu.errors import FetchError
from wanwu.fetch import Fetched, Fetcher
from wanwu.service.contract import ApiError

if TYPE_CHECKING:
    from wanwu.sources import InputItem

MB = 1024 * 1024


class ByteBudget:
    """A count of bytes held, against a limit; ``observe`` is told the new total after each change."""

    def __init__(self, limit: int, observe: Callable[[int], None] = lambda n: None) -> None:
        self.limit = limit
        self.held = 0
        self.observe = observe
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes, or say False (and count nothing) when that would pass the limit."""
        with self._lock:
            if self.held + n > self.limit:
                return False
            self.held += n
            self.observe(self.held)
            return True

    def give(self, n: int) -> None:
        if n:
            with self._lock:
                self.held -= n
                self.observe(self.held)


class BodyLimitMiddleware:
    """Bounds request bodies by size, by the shared :class:`ByteBudget` and by a minimum upload rate."""

    def __init__(self, app: ASGIApp, limit_mb: float, budget: ByteBudget, retry_after_s: int = 1,
                 body_timeout_s: float = 20.0, min_rate: float = 64 * 1024) -> None:
        self.app = app
        self.limit_mb = limit_mb
        self.limit = int(limit_mb * MB)
        self.budget = budget
        self.retry_after_s = retry_after_s
        self.body_timeout_s = body_timeout_s
        self.min_rate = min_rate  # bytes per second, on average, after body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else 0
        refusal = self._too_large() if size > self.limit else (
            self._busy() if self.budget.held + size > self.budget.limit else None)
        if refusal is not None:  # refused at once: nothing to read, nothing held
            await refusal.response()(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        seen = held = 0
        complete = False

        async def limited() -> Message:
            nonlocal seen, held, complete
            if complete:  # the body is in: later receives wait for a disconnect, with no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(start + self.body_timeout_s + seen / self.min_rate):
                    message = await receive()
            except TimeoutError:
                raise self._too_slow(seen, loop.time() - start) from None
            if message["type"] != "http.request":
                return message
            n = len(message.get("body", b""))
            seen += n
            complete = not message.get("more_body", False)
            if seen > self.limit:
                raise self._too_large()
            if n and not self.budget.take(n):
                raise self._busy()
            held += n
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            self.budget.give(held)

    def _too_large(self) -> ApiError:
        return ApiError(413, "payload_too_large", f"the request body is larger than the limit of {self.limit_mb:g} MB")

    def _busy(self) -> ApiError:
        return ApiError(503, "busy", "the server holds too many request bytes at once; retry shortly",
                        {"Retry-After": str(self.retry_after_s)})

    def _too_slow(self, seen: int, elapsed: float) -> ApiError:
        return ApiError(
            408, "body_timeout",
            f"the request body arrived too slowly ({seen:,} bytes in {elapsed:.0f} s); a body may take "
            f"{self.body_timeout_s:g} s plus one second per {self.min_rate / 1024:g} KB", {"Connection": "close"},
        )


class DownloadBudget:
    """URL downloads counted against a :class:`ByteBudget`, each for as long as the request that named the
    URL runs: :meth:`hold` around the request, and :meth:`fetcher` for each recognizer that downloads."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self._accounts: dict[int, list[int]] = {}  # id(item) -> [bytes counted], for the URL items held
        self._current = threading.local()  # the account of the download running on this thread

    def fetcher(self, like: Fetcher) -> BudgetedFetcher:
        return BudgetedFetcher(self, like.max_bytes, like.timeout, like.allow_private)

    @contextlib.contextmanager
    def hold(self, items: list[InputItem]) -> Iterator[None]:
        """Count what the URL ``items`` download until the block ends."""
        accounts = {id(item): [0] for item in items if item.kind == "url"}
        self._accounts.update(accounts)
        try:
            yield
        finally:
            for key, account in accounts.items():
                self._accounts.pop(key, None)
                self.budget.give(account[0])

    @contextlib.contextmanager
    def counting(self, item: InputItem) -> Iterator[None]:
        self._current.account = self._accounts.get(id(item))
        try:
            yield
        finally:
            self._current.account = None

    def take(self, n: int) -> None:
        account: list[int] | None = getattr(self._current, "account", None)
        if account is None:
            return
        if not self.budget.take(n):
            raise FetchError("the server holds too many bytes at once (--max-inflight-mb); retry shortly")
        account[0] += n


class BudgetedFetcher(Fetcher):
    """A :class:`~wanwu.fetch.Fetcher` whose downloads count against a :class:`DownloadBudget`."""

    def __init__(self, downloads: DownloadBudget, max_bytes: int, timeout: float, allow_private: bool) -> None:
        super().__init__(max_bytes, timeout, allow_private)
        self.downloads = downloads

    def fetch(self, item: InputItem) -> Fetched:
        with self.downloads.counting(item):
            return super().fetch(item)

    def downloaded(self, n: int) -> None:
        self.downloads.take(n)
