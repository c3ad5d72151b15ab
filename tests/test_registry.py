"""The one registry type: decorators, lazy "module:attr" entries and real entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wanwu.errors import MissingExtraError, UsageError
from wanwu.registry import PluginError, Registry


def test_decorator_and_direct_entries_keep_order() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("b")
    def b() -> str:
        return "b"

    reg.register("a", len)
    assert reg.names() == ["b", "a"]
    assert reg.get("b") is b and reg.get("a") is len
    with pytest.raises(UsageError, match=r"unknown widget 'c'; available: b, a"):
        reg.get("c")


def test_lazy_entry_imports_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wanwu_lazy_probe.py").write_text("LOADED = True\ndef thing():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry[object] = Registry("widget")
    reg.lazy("probe", "wanwu_lazy_probe:thing")
    assert "wanwu_lazy_probe" not in sys.modules  # naming it imported nothing
    fn = reg.get("probe")
    assert callable(fn) and fn() == 42
    assert "wanwu_lazy_probe" in sys.modules


def test_lazy_builtin_with_missing_dependency_names_the_extra() -> None:
    reg: Registry[object] = Registry("backend")
    reg.lazy("ghost", "wanwu_no_such_module_xyz:Backend", extra="ghost")
    with pytest.raises(MissingExtraError, match=r"\[ghost\]"):
        reg.get("ghost")


def test_entry_point_plugins_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party package declares an entry point in the registry's group; wanwu finds it."""
    (tmp_path / "acme_sink.py").write_text("class AcmeSink:\n    pass\n")
    info = tmp_path / "acme_sink-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sink\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[wanwu.test_sinks]\nacme = acme_sink:AcmeSink\nbroken = acme_missing_module:Sink\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry[type] = Registry("sink", group="wanwu.test_sinks")
    reg.register("jsonl", dict)
    assert reg.names() == ["jsonl", "acme", "broken"]
    assert reg.get("acme").__name__ == "AcmeSink"
    with pytest.raises(PluginError, match="broken"):
        reg.get("broken")


def test_caches_queues_and_input_kinds_take_plug_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One package adds a result cache scheme, a job queue scheme and an input kind through entry points."""
    from wanwu.cache import CACHES, MemoryCache, open_cache
    from wanwu.fetch import FETCHERS, Fetcher
    from wanwu.jobs.base import QUEUES, open_queue
    from wanwu.sources import InputItem

    (tmp_path / "acme_plugin.py").write_text(
        "from wanwu.cache import MemoryCache\n"
        "from wanwu.fetch import FetchKind\n"
        "class Cache(MemoryCache):\n"
        "    def __init__(self, location): super().__init__(); self.location = location\n"
        "def queue(parsed): return ('a queue at', parsed.url)\n"
        "READER = FetchKind(lambda fetcher, item: item.locator.encode(), remote=True)\n"
    )
    info = tmp_path / "acme_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[wanwu.caches]\nacme = acme_plugin:Cache\n[wanwu.queues]\nacme = acme_plugin:queue\n"
        "[wanwu.fetchers]\nacme = acme_plugin:READER\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for registry in (CACHES, QUEUES, FETCHERS):  # look again, as a fresh process would
        monkeypatch.setattr(registry, "_plugins_loaded", False)
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    cache = open_cache("acme://somewhere")
    assert isinstance(cache, MemoryCache) and cache.location == "acme://somewhere"  # type: ignore[attr-defined]
    assert open_queue("acme://host/q") == ("a queue at", "acme://host/q")  # type: ignore[comparison-overlap]
    fetched = Fetcher().fetch(InputItem("x", "acme", "bytes of x"))
    assert fetched.data == b"bytes of x" and FETCHERS.remote("acme")
    assert "acme" in CACHES.names() and "acme" in QUEUES.names()


def test_one_input_model_on_every_wire() -> None:
    """An input is the same InputItem in a Ray row, on the queue and back."""
    from wanwu.jobs.base import JobInput
    from wanwu.sources import InputItem

    items = [InputItem("https://example.com/a.jpg", "url", "https://example.com/a.jpg"),
             InputItem("photos/b.jpg", "file", "/abs/photos/b.jpg"),
             InputItem("s3://bucket/c.jpg", "object", "s3://bucket/c.jpg"),
             InputItem.failed("gone.jpg", "no such file"),
             InputItem.failed("odd://x", "unsupported scheme", "unsupported")]
    for item in items:
        assert InputItem.from_row(item.to_row()) == item  # a Ray row
        queued = JobInput.from_wire(JobInput.by_reference(item).to_wire())  # a queued task's input
        assert queued.to_item() == item
    upload = JobInput.upload("d.png", b"\x89PNG...")
    assert JobInput.from_wire(upload.to_wire()).to_item(b"\x89PNG...") == InputItem(
        "d.png", "bytes", upload.ref, b"\x89PNG...")
    assert JobInput.from_wire(upload.to_wire()).to_item(None).kind == "missing"  # its bytes are gone
