"""The HTTP service (``wanwu serve``): FastAPI + uvicorn over the engine, with one dynamic batcher.

Needs the ``server`` extra. :func:`create_app` is imported lazily so that :class:`ServeConfig` (and the
CLI's help) work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wanwu.service.config import ServeConfig

if TYPE_CHECKING:
    from wanwu.service.app import create_app

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from wanwu.service.app import create_app

        return create_app
    raise AttributeError(name)
