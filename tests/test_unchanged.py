"""The stat memo: unchanged inputs are answered without being read, and a changed one is never given its old
answer (new inode, rewritten in place, touched, another machine's memo, a damaged memo, a URL whose ETag
changes; objects overwritten in S3 are in test_s3.py)."""

from __future__ import annotations

import gc
import hashlib
import http.server
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import wanwu.cache.memo
import wanwu.fetch
from wanwu.cache.memo import RACY_NS, Remembered, file_stamp, memo_path, trusted_file
from wanwu.cache.memo_sqlite import SqliteMemo
from wanwu.cli.main import main
from wanwu.config import RecognizeOptions
from wanwu.pipeline import Recognizer
from wanwu.records import Prediction, Record
from wanwu.sinks import dumps
from wanwu.unchanged import Look, Prober

HOUR_NS = 3600 * 10**9


class _Reads:
    """Counts every input the fetcher reads (opens or downloads), by input."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_input: Counter[str] = Counter()
        original = wanwu.fetch.Fetcher.fetch

        def fetch(fetcher: Any, item: Any, known: Any = None) -> Any:
            self.by_input[item.input] += 1
            return original(fetcher, item, known)

        monkeypatch.setattr(wanwu.fetch.Fetcher, "fetch", fetch)

    def take(self) -> Counter[str]:
        out, self.by_input = self.by_input, Counter()
        return out


def _aged(path: Path, data: bytes, age_ns: int = HOUR_NS, mtime_ns: int | None = None) -> Path:
    """Write ``data`` and date the file ``age_ns`` back (or at ``mtime_ns``), as files of a collection are."""
    path.write_bytes(data)
    when = mtime_ns if mtime_ns is not None else time.time_ns() - age_ns
    os.utime(path, ns=(when, when))
    return path


def _padded(data: bytes, size: int) -> bytes:
    """A JPEG grown to ``size`` bytes: the decoder ignores what follows the end-of-image marker."""
    assert len(data) <= size
    return data + b"\0" * (size - len(data))


@pytest.fixture
def model(mobilenet: tuple[Path, Path], tmp_path: Path) -> Iterator[Callable[..., Recognizer]]:
    """Opens a recognizer on the real MobileNet, with a cache (and memo) of this test's own."""

    def open_recognizer(**options: Any) -> Recognizer:
        opts = RecognizeOptions(**{"decoders": 0, "batch_size": 4, "cache_path": tmp_path / "c.sqlite3", **options})
        return Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=opts)

    yield open_recognizer


@pytest.fixture
def rec(model: Callable[..., Recognizer]) -> Iterator[Recognizer]:
    with model() as r:
        yield r


@pytest.fixture
def two_photos(photos: Path) -> tuple[bytes, bytes]:
    """Two photos of different content, the first the larger."""
    files = sorted(photos.glob("*.JPEG"))[:40]
    a, b = sorted((p.read_bytes() for p in files), key=len)[-1], sorted((p.read_bytes() for p in files), key=len)[0]
    return a, b


def _run(rec: Recognizer, *inputs: Path | str) -> tuple[list[dict[str, Any]], int]:
    """Records, and how many inputs this run answered without reading them."""
    before = rec.unchanged
    records = [r.to_dict() for r in rec.recognize([str(i) for i in inputs])]
    return records, rec.unchanged - before


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- local files ------------------------------------------------------------------------------------------


def test_unchanged_files_are_not_read_and_get_the_same_records(
    rec: Recognizer, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    for src in sorted(photos.glob("*.JPEG"))[:6]:
        _aged(folder / src.name, src.read_bytes())
    reads = _Reads(monkeypatch)
    first, unchanged = _run(rec, folder)
    assert unchanged == 0 and sum(reads.take().values()) == 6
    again, unchanged = _run(rec, folder)
    assert unchanged == 6 and not reads.take()  # not one file opened
    assert again == first and all(r["status"] == "ok" for r in again)
    os.link(sorted(folder.iterdir())[0], tmp_path / "backup.jpg")  # a hard link elsewhere changes only the ctime
    again, unchanged = _run(rec, folder)
    assert unchanged == 6 and not reads.take() and again == first


def test_a_rerun_looks_its_inputs_up_in_its_own_thread_and_a_busy_run_on_the_fetch_threads(
    rec: Recognizer, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing each block of a rerun to a fetch thread and back passed the interpreter lock between the two at
    every ``stat`` (a fifth of a rerun answered from the memo). A run with nothing else in flight looks a block
    up in its own thread; a run with fetches in flight still hands its blocks to the fetch threads."""
    sources = [_aged(tmp_path / src.name, src.read_bytes()) for src in sorted(photos.glob("*.JPEG"))[:4]]
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(300):  # distinct paths: several blocks (16, 32, 64, …)
        os.link(sources[i % len(sources)], folder / f"{i:03d}.jpg")
    here: list[bool] = []
    original = Prober.probe

    def probe(prober: Prober, *args: Any) -> Any:
        here.append(threading.current_thread() is threading.main_thread())
        return original(prober, *args)

    monkeypatch.setattr(Prober, "probe", probe)
    first, unchanged = _run(rec, folder)
    assert unchanged == 0 and here[0] and not all(here)  # the first block here; later ones beside the reads
    here.clear()
    again, unchanged = _run(rec, folder)
    assert unchanged == 300 and again == first and len(here) > 3 and all(here)


def test_same_size_and_mtime_but_a_new_inode_is_read_again(
    rec: Recognizer, two_photos: tuple[bytes, bytes], tmp_path: Path
) -> None:
    old, new = two_photos
    target = _aged(tmp_path / "x.jpg", old)
    before = target.stat()
    first, _ = _run(rec, target)
    assert first[0]["sha256"] == _sha(old)
    replacement = _aged(tmp_path / "x.jpg.tmp", _padded(new, len(old)), mtime_ns=before.st_mtime_ns)
    os.replace(replacement, target)  # the usual way files are replaced: a new inode, same name
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino
    records, unchanged = _run(rec, target)
    assert unchanged == 0
    assert records[0]["sha256"] == _sha(_padded(new, len(old))) and records[0]["predictions"] != first[0]["predictions"]


def test_content_rewritten_in_place_within_the_same_second_is_read_again(
    rec: Recognizer, two_photos: tuple[bytes, bytes], tmp_path: Path
) -> None:
    old, new = two_photos
    # Written "now", as the first run reads it: its timestamp is within one tick of that read. (Dated a few
    # seconds ahead, so that the first run's read falls within the tick even on a machine that stalls.)
    target = _aged(tmp_path / "x.jpg", old, mtime_ns=time.time_ns() + 5 * 10**9)
    mtime = target.stat().st_mtime_ns
    first, _ = _run(rec, target)
    with open(target, "r+b") as f:  # same inode, same size, and the timestamp put back as it was
        f.write(_padded(new, len(old)))
    os.utime(target, ns=(mtime, mtime))
    records, unchanged = _run(rec, target)
    assert unchanged == 0 and records[0]["sha256"] == _sha(_padded(new, len(old)))
    assert records[0]["predictions"] != first[0]["predictions"]


def test_a_touched_file_is_read_again_then_known_again(
    rec: Recognizer, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = sorted(photos.glob("*.JPEG"))[3].read_bytes()
    target = _aged(tmp_path / "x.jpg", data, age_ns=2 * HOUR_NS)
    first, _ = _run(rec, target)
    _aged(target, data)  # touched: a newer mtime, the same bytes
    reads = _Reads(monkeypatch)
    records, unchanged = _run(rec, target)
    assert unchanged == 0 and reads.take()[str(target)] == 1  # read again, and found in the cache
    assert records == first
    records, unchanged = _run(rec, target)
    assert unchanged == 1 and not reads.take() and records == first


def test_rehash_reads_everything_and_refreshes_the_memo(
    model: Callable[..., Recognizer], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [_aged(tmp_path / p.name, p.read_bytes()) for p in sorted(photos.glob("*.JPEG"))[:3]]
    for rehash, expect_unchanged in ((False, 0), (True, 0), (False, 3)):
        with model(rehash=rehash) as r:
            reads = _Reads(monkeypatch)
            _, unchanged = _run(r, *files)
            assert unchanged == expect_unchanged
            assert sum(reads.take().values()) == 3 - expect_unchanged


def _set_sha(memo: Path, path: Path, sha: bytes) -> None:
    """Rewrite the sha256 the memo remembers for the file at ``path``."""
    conn = sqlite3.connect(memo)
    suffix = str(path).encode()
    rows = conn.execute("UPDATE memo SET sha = ? WHERE substr(key, -?) = ?", (sha, len(suffix), suffix)).rowcount
    assert rows == 1
    conn.commit()
    conn.close()


def test_a_memo_from_another_machine_is_never_used(
    model: Callable[..., Recognizer], two_photos: tuple[bytes, bytes], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = two_photos
    other = _aged(tmp_path / "other.jpg", new)
    target = _aged(tmp_path / "x.jpg", old)
    monkeypatch.setattr(wanwu.cache.memo, "machine_id", lambda: "alpha")
    with model() as alpha:
        _run(alpha, other, target)  # both results cached; the memo knows both files, on machine "alpha"
        memo = memo_path(Path(alpha.options.cache_location()))
    # On "alpha", x.jpg held other.jpg's content: its entry says so, with this file's stamp.
    _set_sha(memo, target, bytes.fromhex(_sha(new)))
    with model() as alpha:
        records, _ = _run(alpha, target)
        assert records[0]["sha256"] == _sha(new)  # the control: on "alpha" its entry is trusted
    monkeypatch.setattr(wanwu.cache.memo, "machine_id", lambda: "beta")
    with model() as beta:
        records, unchanged = _run(beta, target)
    assert unchanged == 0 and records[0]["sha256"] == _sha(old)


def test_a_damaged_memo_is_a_miss_and_is_started_afresh(
    model: Callable[..., Recognizer], photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = [_aged(tmp_path / p.name, p.read_bytes()) for p in sorted(photos.glob("*.JPEG"))[:3]]
    with model() as rec:
        first, _ = _run(rec, *files)
        path = memo_path(Path(rec.options.cache_location()))
    _set_sha(path, files[0], b"\0")
    with model() as rec:  # one entry that cannot be read back: a miss
        records, unchanged = _run(rec, *files)
    assert records == first and unchanged == 2
    path.write_bytes(b"this is not a database" * 100)  # the whole file damaged: every input read, no error
    for name in (path.name + "-wal", path.name + "-shm"):
        (path.parent / name).unlink(missing_ok=True)
    with model() as rec:
        records, unchanged = _run(rec, *files)
        assert records == first and unchanged == 0
        records, unchanged = _run(rec, *files)
        assert records == first and unchanged == 3  # a fresh memo was started
    assert "moved aside" in caplog.text


# --- the rule itself --------------------------------------------------------------------------------------


def test_the_racy_timestamp_rule_and_the_stamp(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    st = path.stat()
    stamp = file_stamp(st)
    assert stamp is not None and file_stamp(os.stat(tmp_path)) is None  # folders are never memoized
    m = st.st_mtime_ns
    assert trusted_file(Remembered(stamp, "0" * 64, m + RACY_NS + 1), stamp, m)
    # read within the timestamp tick of its last change: a change after the read could keep the stamp
    assert not trusted_file(Remembered(stamp, "0" * 64, m + RACY_NS - 1), stamp, m)
    assert not trusted_file(Remembered(stamp, "0" * 64, m), stamp, m)
    dev, ino, size, mtime = stamp.split(":")
    for changed in (f"{int(dev) + 1}:{ino}:{size}:{mtime}", f"{dev}:{int(ino) + 1}:{size}:{mtime}",
                    f"{dev}:{ino}:{int(size) + 1}:{mtime}", f"{dev}:{ino}:{size}:{int(mtime) + 1}"):
        assert not trusted_file(Remembered(changed, "0" * 64, m + HOUR_NS), stamp, m)


def test_the_prober_trusts_only_an_old_enough_identical_stamp(tmp_path: Path) -> None:
    path = _aged(tmp_path / "f.jpg", b"abc")
    memo = SqliteMemo(tmp_path / "memo.sqlite3")
    prober = Prober(memo)
    from wanwu.sources import InputItem

    item = InputItem(str(path), "file", str(path))
    look = prober.probe([item], None, "ns").looks[0]
    assert isinstance(look, Look) and look.sha256 is None and look.stamp is not None
    memo.put_many([(look.key, Remembered(look.stamp, _sha(b"abc"), look.checked_ns))])
    assert prober.probe([item], None, "ns").looks[0].sha256 == _sha(b"abc")  # type: ignore[union-attr]
    assert Prober(memo, rehash=True).probe([item], None, "ns").looks[0].sha256 is None  # type: ignore[union-attr]
    memo.close()


# --- URLs -------------------------------------------------------------------------------------------------


class _Resource:
    """One image served with an ETag; conditional GETs answered 304 while it is unchanged."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.status: Counter[int] = Counter()

    @property
    def etag(self) -> str:
        return '"' + _sha(self.data)[:16] + '"'


@pytest.fixture
def served(two_photos: tuple[bytes, bytes]) -> Iterator[tuple[str, _Resource]]:
    resource = _Resource(two_photos[0])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("If-None-Match") == resource.etag:
                resource.status[304] += 1
                self.send_response(304)
                self.send_header("ETag", resource.etag)
                self.end_headers()
                return
            resource.status[200] += 1
            self.send_response(200)
            self.send_header("ETag", resource.etag)
            self.send_header("Content-Length", str(len(resource.data)))
            self.end_headers()
            self.wfile.write(resource.data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/photo.jpg", resource
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_url_is_revalidated_and_a_changed_etag_is_downloaded_again(
    model: Callable[..., Recognizer], served: tuple[str, _Resource], two_photos: tuple[bytes, bytes]
) -> None:
    url, resource = served
    with model(allow_private_urls=True) as r:
        first, unchanged = _run(r, url)
        assert unchanged == 0 and resource.status == Counter({200: 1})
        again, unchanged = _run(r, url)
        assert unchanged == 1 and resource.status == Counter({200: 1, 304: 1}) and again == first
        resource.data = two_photos[1]  # a new version: a new ETag
        records, unchanged = _run(r, url)
        assert unchanged == 0 and resource.status[200] == 2
        assert records[0]["sha256"] == _sha(two_photos[1]) and records[0]["predictions"] != first[0]["predictions"]


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_summary_stats_and_prune(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    for src in sorted(photos.glob("*.JPEG"))[:4]:
        _aged(folder / src.name, src.read_bytes())
    cache = tmp_path / "c.sqlite3"
    args = ["recognize", str(folder), "-m", str(mobilenet[0]), "-l", str(mobilenet[1]), "-j", "0",
            "--cache", str(cache)]
    assert main([*args, "-o", str(tmp_path / "a.jsonl")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.jsonl")]) == 0
    assert "4 from the cache, 4 unchanged (not read)" in capsys.readouterr().err.replace("\n", "")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert main([*args, "--rehash", "-o", str(tmp_path / "c.jsonl")]) == 0
    assert "unchanged" not in capsys.readouterr().err
    assert main(["cache", "stats", "--cache", str(cache), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["memo"]["entries"] == 4 and stats["memo"]["bytes_on_disk"] > 0
    assert main(["cache", "stats", "--cache", str(cache)]) == 0
    assert "memo" in capsys.readouterr().out
    sorted(folder.iterdir())[0].unlink()
    assert main(["cache", "prune", "--cache", str(cache)]) == 0
    assert "1 memo entr" in capsys.readouterr().out
    assert main(["cache", "stats", "--cache", str(cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memo"]["entries"] == 3


# --- writing records fast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [
    Record("a.jpg", "ok", [Prediction(1, "猫", 0.5), Prediction(7, 'q"\\\n\t\u2028', 1e-07)], "ab" * 32, 640, 480),
    Record("\udcff名.jpg", "ok", [Prediction(3, "狗", 0.25, "dog")], None, None, None, warnings=("exif", "é\x00")),
    Record("b.jpg", "ok", [], "cd", 1, 2),
    Record.failure("c.jpg", "decode_error", "bad \"file\""),
    Record("d.jpg", "ok", [Prediction(0, "x", 3.0), Prediction(1, "y", 12345678.901234)], "ef", 3, 4),
    Record("e.jpg", "ok", [Prediction(0, "x", float("nan")), Prediction(1, "y", float("-inf"))], "ef", 3, 4),
])
def test_records_are_written_exactly_as_json_dumps_writes_them(record: Record) -> None:
    assert dumps(record) == json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))


# --- the Ray stage ----------------------------------------------------------------------------------------


def test_the_ray_decode_stage_answers_from_the_same_memo(
    model: Callable[..., Recognizer], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's CPU stage (a plain function: run here without a cluster) reads and writes the node's memo."""
    import numpy as np

    from wanwu.ray.stages import decode_batch, item_rows
    from wanwu.rules import Context
    from wanwu.sources import expand

    folder = tmp_path / "set"
    folder.mkdir()
    for src in sorted(photos.glob("*.JPEG"))[:4]:
        _aged(folder / src.name, src.read_bytes())
    with model() as rec:  # results cached by a local run (the Ray stage reads the same cache)
        _run(rec, folder)
        spec, options = rec.spec, rec.options
    memo_path(Path(options.cache_location())).unlink()  # the memo starts empty: the Ray stage fills it
    rows = item_rows(expand([str(folder)]))
    batch = {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}
    context = Context.of(spec, options)
    reads = _Reads(monkeypatch)
    first = decode_batch(batch, context=context, options=options)
    assert sum(reads.take().values()) == 4 and all(first["cached"])
    again = decode_batch(batch, context=context, options=options)
    assert not reads.take()  # answered by the memo and the cache: no file opened
    assert list(again["sha256"]) == list(first["sha256"]) and list(again["cached"]) == list(first["cached"])


# --- the Redis memo (a cluster's) -------------------------------------------------------------------------


@pytest.mark.extra("queue")
def test_the_redis_memo_round_trips_prunes_and_is_a_miss_when_unreachable(tmp_path: Path) -> None:
    import redis

    from tests import jobs_support as js
    from tests.test_jobs_redis import RedisServer
    from wanwu.cache.memo_redis import PREFIX, RedisMemo

    server = RedisServer(tmp_path, js.free_port(), durable=False)
    server.start()
    client = redis.Redis(port=server.port)
    try:
        memo = RedisMemo(client)
        kept, gone = _aged(tmp_path / "kept.jpg", b"a"), _aged(tmp_path / "gone.jpg", b"b")
        entries = {wanwu.cache.memo.file_key(str(p), "m1"): Remembered(f"1:2:3:{i}", _sha(p.read_bytes()), 7 + i)
                   for i, p in enumerate((kept, gone))}
        entries["s3://b/k.jpg"] = Remembered("5:etag:", _sha(b"c"), 9)
        memo.put_many(entries.items())
        assert memo.get_many([*entries, "s3://b/missing.jpg"]) == entries
        client.set(PREFIX + b"s3://b/k.jpg", b"damaged")  # an entry that cannot be read back: a miss
        assert "s3://b/k.jpg" not in memo.get_many(["s3://b/k.jpg"])
        gone.unlink()
        assert memo.prune("m1") == 1 and memo.prune("m2") == 0
        assert list(memo.get_many(list(entries))) == [wanwu.cache.memo.file_key(str(kept), "m1")]
        stats = memo.stats()
        assert (stats.entries, stats.files) == (2, 1)
        server.stop()
        assert memo.get_many(list(entries)) == {}  # the server is gone: misses, not errors
        memo.put_many(entries.items())
    finally:
        client.close()
        server.stop()


def test_a_file_above_max_bytes_is_refused_even_when_unchanged(
    model: Callable[..., Recognizer], photos: Path, tmp_path: Path
) -> None:
    data = sorted(photos.glob("*.JPEG"))[5].read_bytes()
    target = _aged(tmp_path / "x.jpg", data)
    with model() as rec:
        first, _ = _run(rec, target)
    with model(max_bytes=len(data) - 1) as rec:
        records, unchanged = _run(rec, target)
    assert first[0]["status"] == "ok" and unchanged == 0 and records[0]["error"]["type"] == "too_large"


def test_a_queue_worker_answers_unchanged_paths_from_the_memo(
    model: Callable[..., Recognizer], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wanwu.jobs.base import JobInput, JobSpec, open_queue
    from wanwu.jobs.worker import WorkerConfig, run_worker

    folder = tmp_path / "set"
    folder.mkdir()
    files = [_aged(folder / p.name, p.read_bytes()) for p in sorted(photos.glob("*.JPEG"))[:3]]
    queue = open_queue(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    reads = _Reads(monkeypatch)
    try:
        with model() as rec:
            results = []
            for expect_unchanged in (0, 3):
                job = queue.submit(JobSpec([JobInput.path(str(f)) for f in files]))
                before = rec.unchanged
                run_worker(queue, rec, WorkerConfig(allow_roots=(folder,), exit_when_idle=True, poll_s=0.05))
                assert rec.unchanged - before == expect_unchanged
                assert sum(reads.take().values()) == 3 - expect_unchanged
                results.append([r.to_dict() for r in queue.results(job)])
        assert results[0] == results[1] and all(r["status"] == "ok" for r in results[0])
    finally:
        queue.close()


@pytest.mark.extra("queue")
def test_a_redis_cache_keeps_the_memo_beside_it_so_a_rerun_reads_nothing(
    model: Callable[..., Recognizer], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--cache redis://…``: the memo is in the same database (any node of a cluster finds it), not a file."""
    from tests.servers import redis_server
    from wanwu.cache.memo_redis import RedisMemo

    folder = tmp_path / "set"
    folder.mkdir()
    for src in sorted(photos.glob("*.JPEG"))[3:6]:
        _aged(folder / src.name, src.read_bytes())
    reads = _Reads(monkeypatch)
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as url:
        with model(cache_path=url) as rec:
            assert rec.prober is not None and isinstance(rec.prober.memo, RedisMemo)
            first, unchanged = _run(rec, folder)
        assert unchanged == 0 and sum(reads.take().values()) == 3
        with model(cache_path=url) as rec:
            again, unchanged = _run(rec, folder)
    assert unchanged == 3 and not reads.take()  # answered from the memo and the cache: no file opened
    assert again == first
    assert not list(tmp_path.glob("**/*.sqlite3"))  # no memo file beside a Redis cache


def test_a_long_rerun_is_not_slowed_by_the_garbage_collector(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    """A rerun answered from the cache allocates a few dozen short-lived objects per record: with Python's
    defaults the collector would run every 700 allocations (and scan the whole process now and then). The
    command collects rarely while it runs, and puts the collector back as it was afterwards."""
    sources = [_aged(tmp_path / src.name, src.read_bytes()) for src in sorted(photos.glob("*.JPEG"))[:4]]
    folders = {"few": 3, "many": 3000}
    for name, n in folders.items():
        (tmp_path / name).mkdir()
        for i in range(n):  # hard links: distinct paths (distinct records), already known by their inode
            os.link(sources[i % len(sources)], tmp_path / name / f"{i:04d}.jpg")
    args = ["-m", str(mobilenet[0]), "-l", str(mobilenet[1]), "-j", "0", "--cache", str(tmp_path / "c.sqlite3"),
            "-q", "-o", str(tmp_path / "out.jsonl")]
    for name in folders:
        assert main(["recognize", str(tmp_path / name), *args]) == 0  # every file read once, remembered
    young: Counter[str] = Counter()
    oldest: Counter[str] = Counter()
    before = gc.get_threshold(), gc.get_freeze_count()
    for name in folders:
        def count(phase: str, info: dict[str, int], name: str = name) -> None:
            if phase == "start":
                young[name] += info["generation"] == 0
                oldest[name] += info["generation"] == 2

        gc.callbacks.append(count)
        try:
            assert main(["recognize", str(tmp_path / name), *args]) == 0
        finally:
            gc.callbacks.remove(count)
        assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").count("\n") == folders[name]
    # 3,000 more records: with Python's defaults, over a hundred more collections of the young objects
    assert young["many"] - young["few"] <= 10 and oldest["many"] <= oldest["few"]
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
