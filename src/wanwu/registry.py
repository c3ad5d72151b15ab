"""One registry type for every pluggable part: backends, architectures, model loaders, sources, sinks, resume
readers, job queues.

A :class:`Registry` maps a name to a thing. Entries are added three ways, all resolved lazily, so naming an
entry costs nothing until it is used (a backend that needs torch imports torch only when chosen):

* ``@registry.register("name")`` on a class or function, in the module that defines it;
* ``registry.lazy("name", "package.module:attr")`` for built-ins that live in modules with heavy imports;
* an ``importlib.metadata`` entry point in the registry's group (``wanwu.backends``, ``wanwu.sinks``, …), so
  a third-party package adds one by declaring it in its own ``pyproject.toml``::

      [project.entry-points."wanwu.sinks"]
      parquet = "my_package.sinks:ParquetSink"

A lazy entry whose import fails raises :class:`~wanwu.errors.MissingExtraError` naming the extra to install
(built-ins) or a :class:`~wanwu.errors.WanwuError` naming the plugin (entry points): never a silent fallback.
Insertion order is kept; registries whose entries are tried in turn (sources, loaders) rely on it.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from wanwu.errors import MissingExtraError, UsageError, WanwuError
from wanwu.paths import keep, wanwu_home

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Lazy:
    target: str  # "package.module:attr"
    extra: str | None  # the extra that provides its dependencies (built-ins), for the error message
    plugin: bool  # came from an entry point


class PluginError(WanwuError):
    """A registered plugin could not be loaded."""


class Registry(Generic[T]):
    """Name → thing, filled by decorators, lazy ``"module:attr"`` targets and entry points."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind  # "backend", "sink", … (for messages)
        self.group = group  # the entry-point group, e.g. "wanwu.sinks"
        self._entries: dict[str, T | _Lazy] = {}
        self._plugins_loaded = group is None
        self._lock = threading.RLock()

    # -- filling ----------------------------------------------------------------------------------------

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name`` (a decorator when ``obj`` is left out). A later entry replaces one."""
        if obj is not None:
            with self._lock:
                self._entries[name] = obj
            return obj

        def wrap(thing: T) -> T:
            with self._lock:
                self._entries[name] = thing
            return thing

        return wrap

    def lazy(self, name: str, target: str, *, extra: str | None = None) -> None:
        """Add ``"module:attr"`` under ``name``, imported on first use. ``extra`` names the pip extra."""
        if ":" not in target:
            raise ValueError(f"lazy registry target must be 'module:attr', got {target!r}")
        with self._lock:
            self._entries.setdefault(name, _Lazy(target, extra, plugin=False))

    # -- reading ----------------------------------------------------------------------------------------

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is a :class:`UsageError` listing the known ones.

        A name registered here is found without reading entry points (a plugin never replaces one)."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            self._load_plugins()
            with self._lock:
                entry = self._entries.get(name)
        if entry is None:
            raise UsageError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._resolve(name, entry)

    def __contains__(self, name: object) -> bool:
        if name in self._entries:
            return True
        self._load_plugins()
        return name in self._entries

    def names(self) -> list[str]:
        self._load_plugins()
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """Every entry in registration order, resolving lazy ones as it goes."""
        for name in self.names():
            yield name, self.get(name)

    # -- internals --------------------------------------------------------------------------------------

    def _resolve(self, name: str, entry: T | _Lazy) -> T:
        if not isinstance(entry, _Lazy):
            return entry
        module_name, _, attr = entry.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            if entry.plugin:
                raise PluginError(f"{self.kind} plugin {name!r} ({entry.target}) failed to import: {e}") from e
            if entry.extra is not None:
                raise MissingExtraError(e.name or module_name, entry.extra, f"the {self.kind} {name!r}") from e
            raise
        with self._lock:
            current = self._entries.get(name)
            if isinstance(current, _Lazy):  # importing did not register it under this name itself
                try:
                    current = getattr(module, attr)
                except AttributeError:
                    raise PluginError(f"{self.kind} {name!r}: {module_name} has no attribute {attr!r}") from None
                self._entries[name] = current
        return current  # type: ignore[return-value]

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        with self._lock:
            if self._plugins_loaded:
                return
            self._plugins_loaded = True
            assert self.group is not None
            for name, value in _installed_entry_points(tuple(sys.path)).get(self.group, ()):
                self._entries.setdefault(name, _Lazy(value, None, plugin=True))


@functools.lru_cache(maxsize=4)
def _installed_entry_points(path: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
    """wanwu's entry points (group -> [(name, "module:attr")]), read once per process and ``sys.path``.

    Reading them means importing importlib.metadata and opening every installed distribution (60-70 ms of
    CPU, as much as the rest of a one-photo run's own work), so the result is also kept in
    ``$WANWU_HOME/entry-points.json``, stamped with the modification time of every ``sys.path`` folder that
    holds installed distributions: installing, upgrading or removing a package changes its folder's time, and
    the next run reads afresh. (Folders without any, such as a script's own or the current one, change too
    often to count, and are left out.)"""
    stamp = [[entry, time] for entry in path if (time := _stamp(entry)) != 0]
    memo = wanwu_home() / "entry-points.json"
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if saved["stamp"] == stamp:
            return {group: [(name, value) for name, value in eps] for group, eps in saved["groups"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    from importlib.metadata import entry_points  # only now: importing it alone takes tens of milliseconds

    found = entry_points()
    groups = {group: [(ep.name, ep.value) for ep in found.select(group=group)]
              for group in sorted(found.groups) if group.startswith("wanwu.")}
    keep(memo, json.dumps({"stamp": stamp, "groups": groups}))  # or, in a read-only home, read them again next time
    return groups


def _stamp(entry: str) -> int | None:
    """The modification time of a ``sys.path`` entry that holds distributions (0 for a folder without)."""
    folder = entry or "."
    try:
        if os.path.isdir(folder) and not any(n.endswith((".dist-info", ".egg-info")) for n in os.listdir(folder)):
            return 0
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None
