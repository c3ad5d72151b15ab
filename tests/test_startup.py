"""What a short run does not pay for: decode processes, commands it does not run, entry points read again; and
the reduced-scale JPEG rule that phone photos are decoded by."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import image_bytes
from tests.test_pipeline import crashing_decode
from wanwu import RecognizeOptions, Recognizer
from wanwu.cli.main import COMMANDS, main
from wanwu.decoders import DecodePool, DecodeProcess
from wanwu.engine import Engine
from wanwu.imaging import _resize_crop, _to_rgb, draft_scale, prepare
from wanwu.registry import Registry, _installed_entry_points
from wanwu.run import SHORT_RUN
from wanwu.sources import InputItem
from wanwu.spec import PreprocessSpec

Model = tuple[Path, Path]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts decode processes started (each starts in DecodeProcess._connection)."""
    calls: list[int] = []
    real = DecodeProcess._connection

    def spy(self: DecodeProcess) -> Any:
        if self._process is None:
            calls.append(1)
        return real(self)

    monkeypatch.setattr(DecodeProcess, "_connection", spy)
    return calls


# --- short runs decode in this process ---------------------------------------------------------------------


@pytest.mark.shared
def test_a_one_photo_run_starts_no_decode_process_and_answers_as_one_would(
    mobilenet: Model, photos: Path, started: list[int]
) -> None:
    photo = str(sorted(photos.iterdir())[7])
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=RecognizeOptions(cache=False)) as rec:
        here = rec.recognize_one(photo)
        assert not rec.decoders.started
    assert started == []
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=RecognizeOptions(cache=False, decoders=1)) as rec:
        there = rec.recognize_one(photo)  # -j 1 asks for a decode process: it gets one
    assert started == [1]
    assert here.ok and here.predictions == there.predictions
    assert (here.width, here.height) == (there.width, there.height)


@pytest.mark.shared
def test_a_run_longer_than_short_starts_the_decode_processes(
    mobilenet: Model, photos: Path, started: list[int]
) -> None:
    inputs = [str(p) for p in sorted(photos.iterdir())[: SHORT_RUN + 1]]
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=RecognizeOptions(cache=False)) as rec:
        records = list(rec.recognize(inputs))
        assert rec.decoders.started
        after = rec.recognize_one(inputs[0])  # once they run, a short run uses them too
    assert all(r.ok for r in records) and after.predictions == records[0].predictions
    assert started


def test_work_beside_the_model_loading_runs_in_a_thread_and_never_fails_the_load(
    tiny_model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    engine = Engine.load(str(tiny_model[0]), tiny_model[1], beside=lambda: ran.append(threading.current_thread().name))
    assert ran == ["wanwu-beside-load"]  # done, and waited for, before load returned
    engine.close()

    def broken() -> None:
        raise OSError("no plugins here")

    with caplog.at_level(logging.DEBUG, logger="wanwu"):
        engine = Engine.load(str(tiny_model[0]), tiny_model[1], beside=broken)
    assert engine.spec.num_classes > 0 and "no plugins here" in caplog.text
    engine.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_the_decode_pool_says_whether_images_are_being_decoded(workers: int, tmp_path: Path) -> None:
    """What the service's batcher asks before it waits for more crops: true from a task's submission until just
    before its own callbacks run (the run's, which hand the crop on)."""
    pool = DecodePool(workers)
    try:
        assert not pool.decoding()
        seen: list[bool] = []
        handed_on = threading.Event()
        go = tmp_path / "go"
        future = pool.submit_each(_wait_for_each, [str(go)], timeout=60.0)
        assert pool.decoding()
        go.touch()  # the task may finish now
        future.add_done_callback(lambda _: (seen.append(pool.decoding()), handed_on.set()))
        assert handed_on.wait(60) and seen == [False] and future.result() == [True]
        assert not pool.decoding()
    finally:
        pool.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_the_decode_pool_tells_when_its_last_task_in_flight_ends(workers: int, tmp_path: Path) -> None:
    """Once, when nothing is left in flight (not while another task still runs), and before the task's own
    callbacks: a batcher waiting for the crops on their way is told even when the last decode brings none."""
    pool = DecodePool(workers)
    drained: list[bool] = []  # whether anything was in flight when told
    pool.on_drained = lambda: drained.append(pool.decoding())
    try:
        first, second = tmp_path / "first", tmp_path / "second"
        a = pool.submit_each(_wait_for_each, [str(first)], timeout=60.0)
        b = pool.submit_each(_wait_for_each, [str(second)], timeout=60.0)
        first.touch()
        assert a.result(60) == [True] and drained == [] and pool.decoding()  # the other still decodes
        told_first = threading.Event()
        b.add_done_callback(lambda _: told_first.set() if drained else None)
        second.touch()
        assert b.result(60) == [True] and told_first.wait(60) and drained == [False]
        pool.forget(b)  # forgotten again (a run gives up on a task at its deadline, then it ends): told once
        assert drained == [False]
    finally:
        pool.close()


def _wait_for_each(paths: list[str]) -> list[bool]:
    """Each path's existence, once it exists (or after 60 s)."""
    deadline = time.monotonic() + 60
    while not all(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [os.path.exists(p) for p in paths]


def test_a_short_run_decodes_only_jpeg_and_png_here(
    tiny_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[int]
) -> None:
    """Anything else goes to a decode process, where a crash costs only its file, not the run."""
    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(crashing_decode))
    gif = tmp_path / "a.gif"
    gif.write_bytes(image_bytes(fmt="GIF"))
    inputs: list[Any] = [str(gif), InputItem.from_bytes("crash.jpg", b"CRASH" + image_bytes())]
    with Recognizer(str(tiny_model[0]), labels=tiny_model[1], options=RecognizeOptions(cache=False)) as rec:
        ok, crashed = rec.recognize(inputs)
    assert ok.ok and started
    assert crashed.error is not None and "crashed" in crashed.error.message


@pytest.mark.shared
def test_the_cli_starts_decode_processes_only_for_more_than_a_few_files(
    mobilenet: Model, photos: Path, tmp_path: Path, started: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "--no-cache", "-q", "-f", "jsonl"]
    files = [str(p) for p in sorted(photos.iterdir())[:2]]
    assert main(["recognize", *files, *model]) == 0
    assert started == [] and len(capsys.readouterr().out.splitlines()) == 2
    folder = tmp_path / "in"
    folder.mkdir()
    for p in files:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    assert main(["recognize", str(folder), *model]) == 0  # a folder may hold many: the processes start
    assert started and len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.shared
def test_a_one_photo_run_imports_nothing_only_longer_or_other_runs_need(
    mobilenet: Model, photos: Path, tmp_path: Path
) -> None:
    """Decode processes (multiprocessing), shards, tables, object storage and the GPU decoder are imported by
    the runs that use them: a one-photo run pays for none of them. Nor for rich: its summary goes to a pipe
    here, as plain text."""
    photo, broken = str(sorted(photos.iterdir())[3]), tmp_path / "broken.jpg"
    broken.write_bytes(Path(photo).read_bytes()[:600])  # a truncated photo: a failed record
    code = ("import json, sys\nfrom wanwu.cli.main import main\n"
            f"rc = main(['recognize', {photo!r}, {str(broken)!r}, '--model', {str(mobilenet[0])!r}, '--labels', "
            f"{str(mobilenet[1])!r}, '--no-cache', '-f', 'jsonl', '-o', '/dev/null'])\n"
            "print(json.dumps([rc, sorted(sys.modules)]))")
    for _ in range(2):  # the first run keeps the exact-int8 rewrite of the model (with onnx); the second loads it
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    rc, modules = json.loads(done.stdout.splitlines()[-1])
    assert rc == 3  # partial: one input failed
    unneeded = {"multiprocessing", "concurrent.futures.process", "tarfile", "wanwu.shards", "wanwu.tables",
                "wanwu.objstore", "wanwu.gpudecode", "sqlite3", "onnx", "rich"}
    assert unneeded.isdisjoint(modules), unneeded & set(modules)
    summary = done.stderr.splitlines()[-1]  # its colour tags taken out, not printed
    assert summary.startswith("wanwu: 2 input(s): 1 ok, 1 failed in "), summary


@pytest.mark.shared
def test_the_command_ends_without_teardown_yet_keeps_every_record_and_its_status(
    mobilenet: Model, photos: Path, tmp_path: Path
) -> None:
    """``wanwu`` skips the interpreter's teardown after its exit handlers: records on a pipe and in a file are
    whole, the exit status is the run's, and the decode processes of a longer run are gone."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(photos.iterdir())[:SHORT_RUN + 2]:  # long enough to start decode processes
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    model = ["--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "--no-cache", "-f", "jsonl"]
    token = f"wanwu-exit-test-{os.getpid()}-{tmp_path.name}"  # every process the run starts inherits it
    env = {**_env(), "WANWU_TEST_TOKEN": token}
    command = ["recognize", str(folder), *model, "-o", str(tmp_path / "out.jsonl")]
    to_file = subprocess.run([sys.executable, "-m", "wanwu", *command], capture_output=True, text=True, env=env,
                             timeout=300)
    assert to_file.returncode == 3, to_file.stderr  # one input failed
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == SHORT_RUN + 3 and sum(r["status"] == "ok" for r in records) == SHORT_RUN + 2
    assert "1 failed" in to_file.stderr
    # the decode processes and their forkserver end with the run (the forkserver sees its parent go: a moment)
    deadline = time.monotonic() + 60
    while _processes_holding(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_holding(token) == []
    to_pipe = subprocess.run([sys.executable, "-m", "wanwu", "recognize", str(folder), *model, "-q"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert to_pipe.returncode == 3
    assert [json.loads(line) for line in to_pipe.stdout.splitlines()] == records


def _processes_holding(token: str) -> list[str]:
    """The processes alive with ``WANWU_TEST_TOKEN=token`` in their environment."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"WANWU_TEST_TOKEN={token}".encode() in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:  # gone, or not ours to read
            pass
    return found


# --- wanwu --help imports no command ---------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["C.UTF-8", "zh_CN.UTF-8"])
def test_help_lists_every_command_as_loaded_without_importing_any(lang: str) -> None:
    code = ("import json, sys\nfrom wanwu.cli.main import main\nmain(['--help'])\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('wanwu.cli.', 'numpy', 'PIL')))))")
    env = {**_env(), "LANG": lang, "COLUMNS": "100"}
    env.pop("WANWU_LANG", None)
    lazy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                          timeout=120).stdout.splitlines()
    assert json.loads(lazy[-1]) == ["wanwu.cli.helpformat", "wanwu.cli.localized", "wanwu.cli.main",
                                    "wanwu.cli.messages", "wanwu.cli.progress"]
    eager = f"from wanwu.cli.main import cli, main\nassert len(cli.commands) == {len(COMMANDS)}\nmain(['--help'])"
    loaded = subprocess.run([sys.executable, "-c", eager], capture_output=True, text=True, env=env, check=True,
                            timeout=120).stdout.splitlines()
    assert lazy[:-1] == loaded  # the summaries kept in COMMANDS are the commands' own


# --- entry points: read once, and again when packages change ---------------------------------------------------


def test_entry_points_are_kept_until_a_package_folder_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "other-1.0.dist-info").mkdir()
    (site / "other-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(site))
    _installed_entry_points.cache_clear()  # as a new process would start
    assert Registry("sink", group="wanwu.memo_sinks").names() == []

    def unread() -> None:
        raise AssertionError("entry points read again")

    with monkeypatch.context() as m:  # the next process takes them from $WANWU_HOME/entry-points.json
        m.setattr("importlib.metadata.entry_points", unread)
        _installed_entry_points.cache_clear()
        assert Registry("sink", group="wanwu.memo_sinks").names() == []

    info = site / "acme-1.0.dist-info"  # a plugin is installed into the same folder
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[wanwu.memo_sinks]\nacme = acme_sink:AcmeSink\n")
    later = site.stat().st_mtime_ns + 1_000_000_000
    os.utime(site, ns=(later, later))  # (the clock behind folder times may not have moved yet in a test)
    _installed_entry_points.cache_clear()
    assert Registry("sink", group="wanwu.memo_sinks").names() == ["acme"]


def test_a_registered_name_is_found_without_reading_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    reg: Registry[object] = Registry("sink", group="wanwu.memo_sinks")
    reg.register("jsonl", dict)
    monkeypatch.setattr("wanwu.registry._installed_entry_points", lambda path: pytest.fail("read"))
    assert reg.get("jsonl") is dict and "jsonl" in reg


# --- the reduced-scale JPEG rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "scale"), [
    ((4032, 3024), 8), ((3024, 4032), 8), ((2048, 2048), 8), ((8000, 6000), 8),  # short side /8 >= 256
    ((4000, 2047), 2), ((2047, 2047), 2), ((1024, 1024), 2),  # /8 would go below 256; /2 keeps >= 512
    ((1023, 3000), 1), ((640, 480), 1), ((500, 375), 1),
])
def test_the_eighth_scale_is_picked_only_where_the_short_side_keeps_what_the_model_needs(
    size: tuple[int, int], scale: int
) -> None:
    assert draft_scale(*size, PreprocessSpec()) == scale
    assert draft_scale(*size, PreprocessSpec(jpeg_draft_factor=0)) == 1  # --full-decode


def test_the_rule_follows_the_size_the_model_needs() -> None:
    big = PreprocessSpec(resize_short=512, crop_size=448)  # /8 keeps 378 < 512, /4 keeps 756 < 2 x 512
    assert draft_scale(4032, 3024, big) == 2 and draft_scale(8192, 6144, big) == 8


@pytest.mark.shared
def test_a_phone_photo_is_decoded_at_an_eighth(photos: Path) -> None:
    buf = io.BytesIO()
    Image.open(sorted(photos.iterdir())[3]).convert("RGB").resize((4032, 3024)).save(buf, "JPEG", quality=90)
    spec = PreprocessSpec()
    got = prepare(buf.getvalue(), spec)
    eighth = Image.open(io.BytesIO(buf.getvalue()))
    eighth.draft("RGB", (504, 378))
    assert eighth.size == (504, 378)
    np.testing.assert_array_equal(got.pixels, _resize_crop(_to_rgb(eighth), spec))
    assert (got.width, got.height) == (4032, 3024)


# --- the service's one-file upload ------------------------------------------------------------------------------


def _parsed(body: bytes, content_type: str) -> tuple[list[tuple[str, bytes]], int | None, Any]:
    """What /v1/recognize takes from a multipart body: (name, bytes) per input, top_k and labels."""
    import asyncio

    from starlette.requests import Request

    from wanwu.service.config import ServeConfig
    from wanwu.service.requests import _parse_multipart

    async def parse() -> Any:
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]

        async def receive() -> dict[str, Any]:
            chunk = chunks.pop(0) if chunks else b""
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
        return await _parse_multipart(Request(scope, receive), ServeConfig())

    parsed = asyncio.run(parse())
    return [(i.input, i.data or b"") for i in parsed.items], parsed.top_k, parsed.labels


def _general(body: bytes, content_type: str) -> tuple[list[tuple[str, bytes]], int | None, Any]:
    """The same through the general multipart parser only (the one-file path turned off)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr("wanwu.service.requests._one_file", lambda body, boundary: None)
        return _parsed(body, content_type)


@pytest.mark.extra("server")
@pytest.mark.parametrize("case", ["one", "named", "two", "top_k", "chinese name", "quote in name", "no type"])
def test_a_one_file_upload_reads_as_the_multipart_parser_reads_it(case: str) -> None:
    import httpx

    photo, other = image_bytes(), image_bytes((10, 200, 40), fmt="PNG")
    files: Any = {
        "one": [("files", ("a.jpg", photo, "image/jpeg"))],
        "named": [("files", ("my photo (1).jpg", photo, "image/jpeg"))],
        "two": [("files", ("a.jpg", photo, "image/jpeg")), ("files", ("b.png", other, "image/png"))],
        "top_k": [("files", ("a.jpg", photo, "image/jpeg"))],
        "chinese name": [("files", ("照片.jpg", photo, "image/jpeg"))],
        "quote in name": [("files", ('a"b.jpg', photo, "image/jpeg"))],
        "no type": [("files", ("a.jpg", photo, None))],
    }[case]
    data = {"top_k": "3"} if case == "top_k" else None
    request = httpx.Request("POST", "http://x/v1/recognize", files=files, data=data)
    body, content_type = request.read(), request.headers["content-type"]
    assert _parsed(body, content_type) == _general(body, content_type)
    assert _parsed(body, content_type)[0][0][1] == photo
    from wanwu.service.requests import _boundary, _one_file

    boundary = _boundary(content_type)
    taken = boundary is not None and _one_file(body, boundary) is not None
    assert taken == (case not in ("two", "top_k", "chinese name"))  # the common upload takes the short way


@pytest.mark.extra("server")
def test_a_file_holding_its_own_boundary_is_left_to_the_multipart_parser() -> None:
    inner = b"\xff\xd8 data \r\n--XYZ\r\n more"
    body = (b'--XYZ\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n' + inner
            + b"\r\n--XYZ--\r\n")
    from wanwu.service.requests import _one_file

    assert _one_file(body, b"XYZ") is None
    assert _one_file(body.replace(inner, b"\xff\xd8 plain"), b"XYZ") == ("a.jpg", b"\xff\xd8 plain")


@pytest.mark.extra("server")
@pytest.mark.parametrize("head", [
    b"Content-Type: image/jpeg\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"",  # aiohttp
    b"Content-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\nContent-Type: image/jpeg",
    b"Content-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"",
])
def test_either_order_of_the_parts_headers_takes_the_short_way_and_reads_the_same(head: bytes) -> None:
    photo = image_bytes()
    body = b"--eaa1d821cc60\r\n" + head + b"\r\n\r\n" + photo + b"\r\n--eaa1d821cc60--\r\n"
    content_type = "multipart/form-data; boundary=eaa1d821cc60"
    from wanwu.service.requests import _one_file

    assert _one_file(body, b"eaa1d821cc60") == ("a.jpg", photo)
    assert _parsed(body, content_type) == _general(body, content_type) == ([("a.jpg", photo)], None, None)


@pytest.mark.extra("server")
def test_a_part_with_two_types_is_left_to_the_multipart_parser() -> None:
    body = (b'--XYZ\r\nContent-Type: image/jpeg\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"'
            b"\r\nContent-Type: image/png\r\n\r\n\xff\xd8 data\r\n--XYZ--\r\n")
    from wanwu.service.requests import _one_file

    assert _one_file(body, b"XYZ") is None


# --- the forkserver starts before the command's imports when decode processes will be needed --------------------


@pytest.mark.parametrize(("args", "expected"), [
    (["FOLDER"], True), (["-"], True), (["photos/*.jpg"], True), (["FOLDER", "-o", "out.jsonl"], True),
    (["a.jpg"], False), (["a.jpg", "b.jpg", "-o", "out.jsonl"], False),
    (["FOLDER", "-j", "0"], False), (["FOLDER", "--decoders=0"], False), (["FOLDER", "--runner", "ray"], False),
])
def test_the_forkserver_starts_early_only_for_runs_that_will_start_decoders(
    args: list[str], expected: bool, tmp_path: Path
) -> None:
    from wanwu.forkserver import _will_start_decoders

    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    assert _will_start_decoders(args) is expected


@pytest.mark.shared
def test_recognize_over_a_folder_starts_the_forkserver_before_loading_its_command(
    mobilenet: Model, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wanwu.forkserver

    started: list[bool] = []
    real = wanwu.forkserver.start

    def spy() -> None:
        started.append(True)
        real()

    monkeypatch.setattr(wanwu.forkserver, "start", spy)
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(photos.iterdir())[:SHORT_RUN + 1]:
        (folder / p.name).write_bytes(p.read_bytes())
    model = ["--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "--no-cache", "-q", "-f", "jsonl",
             "-o", str(tmp_path / "out.jsonl")]
    assert main(["recognize", str(sorted(folder.iterdir())[0]), *model]) == 0
    assert started == []  # one file: decoded in this process, no forkserver
    assert main(["recognize", str(folder), *model]) == 0
    assert started == [True]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == SHORT_RUN + 1
