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
