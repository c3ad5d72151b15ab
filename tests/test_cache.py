"""The result cache: encoding, SQLite store, sharing between processes, namespaces, CLI, in-run dedupe."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wanwu
import wanwu.pipeline
from tests.helpers import image_bytes, make_tiny_onnx, with_corrupt_exif
from tests.servers import redis_server
from wanwu.cache import CachedResult, open_cache
from wanwu.cache.sqlite import SCHEMA_VERSION, SqliteCache, decode_top, encode_top
from wanwu.cli.cache import parse_duration, parse_size
from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.errors import CacheError, UsageError
from wanwu.models import write_manifest
from wanwu.pipeline import Recognizer
from wanwu.records import RecordOptions, top_scores
from wanwu.spec import PreprocessSpec

SRC = Path(wanwu.__file__).resolve().parents[1]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (120, 120, 120)]


def _result(seed: int, classes: int = 1000) -> CachedResult:
    raw = np.random.default_rng(seed).normal(size=(1, classes)).astype(np.float32) * 5
    return CachedResult(top_scores(raw)[0], 100 + seed, 50 + seed)


def _key(i: int) -> str:
    return f"{i:064x}"


def _same(a: CachedResult, b: CachedResult) -> bool:
    return (
        np.array_equal(a.top.indices, b.top.indices)
        and np.array_equal(a.top.values, b.top.values)
        and a.top.logsumexp == b.top.logsumexp
        and (a.width, a.height) == (b.width, b.height)
    )


def _images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        color = COLORS[i % len(COLORS)]
        path = folder / f"img{i:04d}.png"
        path.write_bytes(image_bytes(color, size=(64 + i, 48), fmt="PNG"))  # distinct bytes per image
        paths.append(path)
    return paths


class _InferSpy:
    """Counts the images that reach the backend."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        original = wanwu.engine.Engine.infer

        def infer(engine: Any, pixels: list[Any]) -> Any:
            self.images += len(pixels)
            return original(engine, pixels)

        monkeypatch.setattr(wanwu.engine.Engine, "infer", infer)


BACKENDS = ["sqlite", pytest.param("redis", marks=pytest.mark.extra("queue"))]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty cache location of each kind: a SQLite file, a Redis database (the suite runs on both)."""
    if request.param == "sqlite":
        return str(tmp_path / "store" / "cache.sqlite3")
    url: str = request.getfixturevalue("redis_url")
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def _damage(location: str, namespace: str, key: str) -> None:
    """Spoil one stored entry, the way each store can be spoiled."""
    if location.startswith("redis://"):
        import redis

        from wanwu.cache.redis import PREFIX

        client = redis.Redis.from_url(location)
        client.set(PREFIX + namespace.encode() + b":" + bytes.fromhex(key), b"\x01\x02not an entry")
        client.close()
        return
    with sqlite3.connect(location) as conn:
        conn.execute("UPDATE results SET warnings = '{not json' WHERE key = ?", (bytes.fromhex(key),))
    conn.close()


def _run(model: tuple[Path, Path], inputs: list[Path], **options: Any) -> list[dict[str, Any]]:
    shape = {key: options.pop(key) for key in ("top_k", "score", "threshold") if key in options}
    opts = RecognizeOptions(**{"decoders": 0, "batch_size": 4, **options})
    with Recognizer(str(model[0]), labels=model[1], options=opts) as rec:
        return [r.to_dict() for r in rec.recognize([str(p) for p in inputs], RecordOptions(**shape))]


# --- encoding and the store -------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [10, 1000, 70000])
def test_blob_round_trip_is_exact_and_compact(classes: int) -> None:
    result = _result(3, classes)
    blob = encode_top(result.top)
    back = decode_top(blob)
    n = min(50, classes)
    assert np.array_equal(back.indices, result.top.indices) and back.indices.dtype == np.int32
    assert np.array_equal(back.values, result.top.values) and back.values.dtype == np.float32
    assert back.logsumexp == result.top.logsumexp
    assert len(blob) == 12 + n * ((2 if classes <= 65536 else 4) + 4)


def test_store_is_lazy_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "cache.sqlite3"
    cache = SqliteCache(path)
    assert cache.get_many("ns", [_key(1)]) == {}
    assert not path.exists() and not path.parent.exists()  # reads never create the file
    assert cache.stats().exists is False
    items = [(_key(i), _result(i)) for i in range(120)]
    cache.put_many("ns", items)
    assert path.exists()
    got = cache.get_many("ns", [_key(i) for i in range(130)])
    assert set(got) == {_key(i) for i in range(120)}
    assert all(_same(got[k], r) for k, r in items)
    assert cache.get_many("other", [_key(1)]) == {}
    cache.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_every_store_round_trips_results_and_warnings(store: str) -> None:
    noted = CachedResult(_result(2).top, 7, 8, ("UserWarning: Corrupt EXIF data", "第二条\n两行"))
    with open_cache(store) as cache:
        assert cache.get_many("ns", [_key(1)]) == {}
        items = [(_key(i), _result(i)) for i in range(120)]
        cache.put_many("ns", [*items, (_key(500), noted)])
        got = cache.get_many("ns", [_key(i) for i in range(130)] + [_key(500)])
        assert set(got) == {_key(i) for i in range(120)} | {_key(500)}
        assert all(_same(got[k], r) and got[k].warnings == () for k, r in items)
        assert _same(got[_key(500)], noted) and got[_key(500)].warnings == noted.warnings
        assert cache.get_many("other", [_key(1)]) == {}
    with open_cache(store) as reopened:  # and once more, from the store
        assert reopened.get_many("ns", [_key(500)])[_key(500)].warnings == noted.warnings


def test_a_damaged_entry_is_a_miss_in_every_store(store: str) -> None:
    with open_cache(store) as cache:
        cache.put_many("ns", [(_key(1), _result(1)), (_key(2), _result(2))])
    _damage(store, "ns", _key(1))
    with open_cache(store) as cache:
        assert set(cache.get_many("ns", [_key(1), _key(2)])) == {_key(2)}


_SCHEMA_1_WITHOUT_WARNINGS = """
CREATE TABLE namespaces (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, created INTEGER NOT NULL);
CREATE TABLE results (ns INTEGER NOT NULL, key BLOB NOT NULL, top BLOB NOT NULL, width INTEGER NOT NULL,
    height INTEGER NOT NULL, created INTEGER NOT NULL, accessed INTEGER NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def test_warnings_round_trip_and_a_file_from_before_them_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = _result(1)
    with sqlite3.connect(path) as conn:  # a cache written before results kept their warnings
        conn.executescript(_SCHEMA_1_WITHOUT_WARNINGS)
        conn.execute("INSERT INTO namespaces (name, created) VALUES ('ns', 0)")
        conn.execute("INSERT INTO results VALUES (1, ?, ?, ?, ?, 0, 0)",
                     (bytes.fromhex(_key(1)), encode_top(old.top), old.width, old.height))
    conn.close()
    noted = CachedResult(_result(2).top, 7, 8, ("UserWarning: Corrupt EXIF data", "第二条\n两行"))
    with SqliteCache(path) as cache:
        got = cache.get_many("ns", [_key(1)])
        assert _same(got[_key(1)], old) and got[_key(1)].warnings == ()  # the old entry still reads
        cache.put_many("ns", [(_key(2), noted), (_key(3), _result(3))])
        got = cache.get_many("ns", [_key(1), _key(2), _key(3)])
    assert len(got) == 3 and got[_key(3)].warnings == ()
    assert _same(got[_key(2)], noted) and got[_key(2)].warnings == noted.warnings
    with SqliteCache(path) as reopened:  # and once more, from the file
        assert reopened.get_many("ns", [_key(2)])[_key(2)].warnings == noted.warnings
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        stored = dict(conn.execute("SELECT key, warnings FROM results").fetchall())
    conn.close()
    assert stored[bytes.fromhex(_key(3))] is None  # nothing to say costs nothing


def test_stats_clear_and_namespaces(store: str) -> None:
    with open_cache(store) as cache:
        cache.put_many("aaaa1111", [(_key(i), _result(i)) for i in range(10)])
        cache.put_many("bbbb2222", [(_key(i), _result(i)) for i in range(4)])
        stats = cache.stats()
        assert stats.entries == 14 and len(stats.namespaces) == 2
        assert {n.name: n.entries for n in stats.namespaces} == {"aaaa1111": 10, "bbbb2222": 4}
        assert stats.bytes_on_disk > 0 and stats.oldest is not None and stats.newest is not None
        assert 300 < stats.namespaces[0].payload_bytes / stats.namespaces[0].entries < 340
        with pytest.raises(CacheError):
            cache.clear("zzz")
        assert cache.clear("bbbb") == 4
        assert cache.get_many("bbbb2222", [_key(1)]) == {}
        assert len(cache.get_many("aaaa1111", [_key(1), _key(2)])) == 2
        assert cache.clear() == 10
        assert cache.stats().entries == 0


def _set_accessed(path: Path, values: dict[str, int]) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for key, t in values.items():
            conn.execute("UPDATE results SET accessed = ? WHERE key = ?", (t, bytes.fromhex(key)))
    conn.close()


def test_prune_by_age_and_by_size_drops_least_recently_used(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with SqliteCache(path) as cache:
        cache.put_many("ns", [(_key(i), _result(i)) for i in range(400)])
    now = int(time.time())
    _set_accessed(path, {_key(i): now - 86400 * (400 - i) for i in range(400)})  # key 0 oldest
    with SqliteCache(path) as cache:
        assert cache.prune(older_than=100.5 * 86400).removed == 300  # not used for 100 days
        assert set(cache.get_many("ns", [_key(i) for i in range(400)])) == {_key(i) for i in range(300, 400)}
        size = cache.stats().bytes_on_disk
        result = cache.prune(max_size=size // 2)
        assert result.bytes_after <= size // 2 and 0 < result.removed < 100
        left = set(cache.get_many("ns", [_key(i) for i in range(300, 400)]))
        assert left == {_key(i) for i in range(400 - len(left), 400)}  # the most recently used survive


def test_hits_record_last_access(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with SqliteCache(path) as cache:
        cache.put_many("ns", [(_key(i), _result(i)) for i in range(3)])
    _set_accessed(path, {_key(i): 1000 for i in range(3)})
    with SqliteCache(path, touch_interval=60) as cache:
        assert len(cache.get_many("ns", [_key(0)])) == 1
    conn = sqlite3.connect(path)
    rows = dict(conn.execute("SELECT key, accessed FROM results").fetchall())
    conn.close()
    assert rows[bytes.fromhex(_key(0))] >= time.time() - 60
    assert rows[bytes.fromhex(_key(1))] == 1000


def test_not_a_cache_or_newer_schema_is_a_clear_error_and_runs_carry_on(
    tmp_path: Path, tiny_model: tuple[Path, Path]
) -> None:
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match="not a usable wanwu cache"):
        SqliteCache(bad).stats()
    newer = tmp_path / "newer.sqlite3"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(CacheError, match="newer wanwu"):
        SqliteCache(newer).stats()
    # A run never fails because of the cache: it carries on uncached.
    records = _run(tiny_model, _images(tmp_path / "img", 2), cache_path=bad)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert main(["cache", "stats", "--cache", str(bad)]) == 1


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from wanwu.cache import CachedResult, open_cache
    from wanwu.records import top_scores

    path, who, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    cache = open_cache(path)
    rng = np.random.default_rng(who)
    for batch in range(150):
        raw = rng.normal(size=(4, 100)).astype(np.float32)
        tops = top_scores(raw)
        items = [(f"{who:02x}{batch * 4 + i:062x}", CachedResult(t, who, batch)) for i, t in enumerate(tops)]
        items.append(("ff" * 32, CachedResult(top_scores(raw)[0], 7, 7)))  # a key both write
        cache.put_many("shared-ns", items)
        cache.get_many("shared-ns", [items[0][0], f"{(1 - who):02x}{batch * 4:062x}"])
    assert not getattr(cache, "_disabled", False), "a cache operation failed"
    cache.close()
    print("done", who)
    """
)


def test_two_processes_share_one_cache(store: str) -> None:
    path = store  # neither process finds the store: both create it at once
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start = time.time() + 1.5
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(who), str(start)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for who in (0, 1)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in err and "carrying on without" not in err, err
    with open_cache(path) as cache:
        for who in (0, 1):
            keys = [f"{who:02x}{i:062x}" for i in range(600)]
            got = cache.get_many("shared-ns", keys)
            assert len(got) == 600
            assert {r.width for r in got.values()} == {who}
        assert cache.stats().entries == 1201


# --- namespaces: what the key covers ----------------------------------------------------------------------


def _changed_weights(model: tuple[Path, Path], folder: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model[0]))
    for init in proto.graph.initializer:
        if init.name == "B":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.5), "B"))
    folder.mkdir()
    path = folder / "tiny-b.onnx"
    onnx.save(proto, str(path))
    return path


def test_changed_model_or_preprocessing_misses_the_cache(
    tmp_path: Path, tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    images = _images(tmp_path / "img", 5)
    spy = _InferSpy(monkeypatch)
    cache = store
    first = _run(tiny_model, images, cache_path=cache)
    assert spy.images == 5
    assert _run(tiny_model, images, cache_path=cache) == first
    assert spy.images == 5  # same model, same preprocessing: all hits

    other_weights = _changed_weights(tiny_model, tmp_path / "b")
    _run((other_weights, tiny_model[1]), images, cache_path=cache)
    assert spy.images == 10  # different weights: all misses

    folder = tmp_path / "model-dir"
    folder.mkdir()
    (folder / "tiny.onnx").write_bytes(tiny_model[0].read_bytes())
    (folder / "labels.txt").write_bytes(tiny_model[1].read_bytes())
    write_manifest(folder, name="tiny", weights="tiny.onnx", labels="labels.txt",
                   preprocess=PreprocessSpec(resize_short=240))
    _run((folder, None), images, cache_path=cache)  # type: ignore[arg-type]
    assert spy.images == 15  # same weights, different preprocessing: all misses
    with open_cache(cache) as c:
        assert len(c.stats().namespaces) == 3


def test_cache_hits_answer_any_top_k_and_score_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    model, labels = make_tiny_onnx(tmp_path, num_classes=60)
    labels.write_text("".join(f"类{i}\n" for i in range(60)), encoding="utf-8")
    images = _images(tmp_path / "img", 6)
    cache = store
    spy = _InferSpy(monkeypatch)
    _run((model, labels), images, cache_path=cache)  # fills the cache at the default top-5
    assert spy.images == 6
    for top_k, score, threshold in [(1, "softmax", None), (5, "logit", None), (50, "softmax", None),
                                    (50, "logit", None), (50, "softmax", 0.001)]:
        fresh = _run((model, labels), images, cache=False, top_k=top_k, score=score, threshold=threshold)
        before = spy.images
        cached = _run((model, labels), images, cache_path=cache, top_k=top_k, score=score,
                      threshold=threshold)
        assert spy.images == before  # answered from the cache alone
        assert cached == fresh
        if threshold is None:
            assert all(len(r["predictions"]) == top_k for r in cached)


# --- in-run dedupe ----------------------------------------------------------------------------------------


def test_identical_content_is_decoded_and_inferred_once_per_run(
    tmp_path: Path, tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    same = image_bytes((10, 200, 90), size=(300, 200))
    paths = []
    for i in range(40):  # copies of one photo, at the start, in the middle (mixed) and long after
        path = folder / f"{i:03d}.jpg"
        copy = i < 6 or i % 7 == 0 or i == 39
        path.write_bytes(same if copy else image_bytes(COLORS[i % 6], (100 + i, 80)))
        paths.append(path)
    copies = sum(1 for p in paths if p.read_bytes() == same)
    decodes: list[int] = []
    original = wanwu.pipeline._Run.decode

    def counting_decode(datas: list[bytes], spec: PreprocessSpec, max_pixels: int) -> Any:
        decodes.extend(len(d) for d in datas)
        return original(datas, spec, max_pixels)

    monkeypatch.setattr(wanwu.pipeline._Run, "decode", staticmethod(counting_decode))
    spy = _InferSpy(monkeypatch)
    records = _run(tiny_model, paths, cache=False)
    distinct = 40 - copies + 1
    assert len(decodes) == distinct and spy.images == distinct
    assert [r["input"] for r in records] == [str(p) for p in paths]
    dup = [r for r in records if Path(r["input"]).read_bytes() == same]
    assert len(dup) == copies and len({json.dumps(r["predictions"]) for r in dup}) == 1
    assert all(r["status"] == "ok" for r in records)


# --- CLI ----------------------------------------------------------------------------------------------------


def test_a_cached_record_keeps_the_decoders_warnings(
    tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    folder = tmp_path / "in"
    plain = _images(folder, 2)
    odd = folder / "exif.jpg"
    odd.write_bytes(with_corrupt_exif(image_bytes((90, 40, 160), size=(80, 60))))
    inputs = [plain[0], odd, plain[1]]
    cache = store
    # decode workers (-j 1): threads would see Python's once-per-location warning filter
    first = _run(tiny_model, inputs, decoders=1, cache_path=cache)
    assert any("Corrupt EXIF" in w for w in first[1].get("warnings", [])), first[1]
    spy = _InferSpy(monkeypatch)
    again = _run(tiny_model, inputs, decoders=1, cache_path=cache)
    assert spy.images == 0  # every record came from the cache
    assert again == first


def _cli(*args: str) -> int:
    return main(list(args))


def test_cli_cache_option_no_cache_and_cache_commands(
    tmp_path: Path, tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _images(tmp_path / "img", 4)
    model = ["-m", str(tiny_model[0]), "-l", str(tiny_model[1]), "-j", "0", "-q"]
    default = Path(os.environ["WANWU_HOME"]) / "cache.sqlite3"
    spy = _InferSpy(monkeypatch)

    assert _cli("recognize", str(tmp_path / "img"), *model, "--no-cache",
                "-o", str(tmp_path / "a.jsonl")) == 0
    assert spy.images == 4 and not default.exists()  # --no-cache writes nothing

    custom = tmp_path / "elsewhere" / "mine.sqlite3"
    assert _cli("recognize", str(tmp_path / "img"), *model, "--cache", str(custom),
                "-o", str(tmp_path / "b.jsonl")) == 0
    assert custom.exists() and not default.exists() and spy.images == 8
    assert _cli("recognize", str(tmp_path / "img"), *model, "--cache", str(custom), "--no-cache",
                "-o", str(tmp_path / "c.jsonl")) == 0
    assert spy.images == 12  # --no-cache does not read either
    assert _cli("recognize", str(tmp_path / "img"), *model, "--cache", str(custom),
                "-o", str(tmp_path / "d.jsonl")) == 0
    assert spy.images == 12  # warm
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "d.jsonl").read_text()

    capsys.readouterr()
    assert _cli("cache", "stats", "--cache", str(custom), "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 4 and len(stats["namespaces"]) == 1 and stats["bytes_on_disk"] > 0
    assert _cli("cache", "stats", "--cache", str(custom)) == 0
    assert "4 in 1 namespace" in capsys.readouterr().out
    assert _cli("cache", "prune", "--cache", str(custom), "--older-than", "30d") == 0
    assert "removed 0 " in capsys.readouterr().out
    assert _cli("cache", "prune", "--cache", str(custom), "--max-size", "1") == 0
    assert "removed 4 " in capsys.readouterr().out
    assert _cli("recognize", str(tmp_path / "img"), *model, "--cache", str(custom),
                "-o", str(tmp_path / "e.jsonl")) == 0
    assert _cli("cache", "clear", "--cache", str(custom)) == 0
    assert "removed 4 " in capsys.readouterr().out
    assert _cli("cache", "prune", "--cache", str(custom)) == 0  # the stat memo's vanished files only
    assert "memo entries" in capsys.readouterr().out
    assert _cli("cache", "stats") == 0
    assert "not created yet" in capsys.readouterr().out


def test_parse_duration_and_size() -> None:
    assert parse_duration("90d") == 90 * 86400 and parse_duration("12h") == 43200
    assert parse_duration("15") == 15
    assert parse_size("500MB") == 500_000_000 and parse_size("2GiB") == 2 * 1024**3 and parse_size("10") == 10
    for bad in ("soon", "-3d", "1 fortnight"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    for bad in ("big", "-3MB", "5 parsecs"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_a_forked_copy_never_reuses_the_parents_connection(tmp_path: Path) -> None:
    cache = SqliteCache(tmp_path / "c.sqlite3")
    cache.put_many("ns", [(_key(1), _result(1))])
    parents = cache._conn
    cache._pid = -1  # what a child process sees after fork: another pid than the one that connected
    assert len(cache.get_many("ns", [_key(1)])) == 1
    assert cache._conn is not None and cache._conn is not parents
    cache.close()
    assert parents is not None
    parents.execute("SELECT 1")  # the parent's connection was left alone
    parents.close()


# --- choosing a cache by location -------------------------------------------------------------------------


@pytest.mark.extra("queue")
def test_the_cli_uses_a_redis_url_or_wanwu_cache(
    tmp_path: Path, tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = tmp_path / "work"
    _images(work / "img", 3)
    monkeypatch.chdir(work)
    model = ["-m", str(tiny_model[0]), "-l", str(tiny_model[1]), "-j", "0", "-q"]
    spy = _InferSpy(monkeypatch)
    url = redis_url[: -len("/0")] + "/3"  # a database of its own
    assert _cli("recognize", "img", *model, "--cache", url, "-o", "a.jsonl") == 0
    assert spy.images == 3
    monkeypatch.setenv("WANWU_CACHE", url)  # the same cache, named by the environment
    assert _cli("recognize", "img", *model, "-o", "b.jsonl") == 0
    assert spy.images == 3  # all hits
    assert (work / "a.jsonl").read_text() == (work / "b.jsonl").read_text()
    assert sorted(p.name for p in work.iterdir()) == ["a.jsonl", "b.jsonl", "img"]  # no file named redis:…
    capsys.readouterr()
    assert _cli("cache", "stats", "--json") == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 3


def test_an_unsupported_cache_scheme_is_a_usage_error(
    tmp_path: Path, tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    _images(work / "img", 1)
    monkeypatch.chdir(work)
    model = ["-m", str(tiny_model[0]), "-l", str(tiny_model[1]), "-j", "0", "-q"]
    assert _cli("recognize", "img", *model, "--cache", "memcached://127.0.0.1:11211/0") == 2
    assert _cli("cache", "stats", "--cache", "memcached://127.0.0.1:11211/0") == 2
    with pytest.raises(UsageError, match="unsupported scheme 'memcached://'"):
        RecognizeOptions(cache_path="memcached://127.0.0.1:11211/0")
    assert RecognizeOptions(cache_path="memcached://x", cache=False).cache is False  # off: never opened
    assert sorted(p.name for p in work.iterdir()) == ["img"]


def test_a_cache_server_that_is_down_never_fails_a_run(
    tmp_path: Path, tiny_model: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("redis")
    from tests.servers import free_port

    records = _run(tiny_model, _images(tmp_path / "img", 3), cache_path=f"redis://127.0.0.1:{free_port()}/0")
    assert [r["status"] for r in records] == ["ok"] * 3
    assert [r.message for r in caplog.records if "carrying on without it" in r.message][:1]


def test_a_sqlite_cache_on_a_network_file_system_is_refused(
    tmp_path: Path, tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from wanwu.cache import sqlite as sqlite_cache

    (tmp_path / "shared" / "my smb").mkdir(parents=True)  # mount points exist
    mounts = tmp_path / "mounts"
    smb = str(tmp_path / "shared" / "my smb").replace(" ", "\\040")  # as /proc/mounts writes a space
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/export {tmp_path / 'shared'} nfs4 rw,relatime 0 0\n"
        f"//host/share {smb} cifs rw 0 0\n"
    )
    assert sqlite_cache.mounted_filesystem(tmp_path / "local.sqlite3", str(mounts)) == "ext4"
    assert sqlite_cache.mounted_filesystem(tmp_path / "shared" / "a" / "c.sqlite3", str(mounts)) == "nfs4"
    assert sqlite_cache.mounted_filesystem(tmp_path / "shared" / "my smb" / "c.sqlite3", str(mounts)) == "cifs"
    on_nfs = tmp_path / "shared" / "cache.sqlite3"
    with SqliteCache(on_nfs) as cache:  # written before the folder was (said to be) a network mount
        cache.put_many("ns", [(_key(1), _result(1))])
    real = sqlite_cache.mounted_filesystem
    monkeypatch.setattr(sqlite_cache, "mounted_filesystem", lambda path: real(path, str(mounts)))
    with pytest.raises(CacheError, match=r"network file system \(nfs4\).*redis://"):
        SqliteCache(on_nfs).stats()
    assert main(["cache", "stats", "--cache", str(on_nfs)]) == 1
    records = _run(tiny_model, _images(tmp_path / "img", 2), cache_path=on_nfs)
    assert [r["status"] for r in records] == ["ok", "ok"]  # warned, carried on uncached
    monkeypatch.undo()
    with SqliteCache(on_nfs) as cache:
        assert cache.stats().entries == 1  # nothing written there
