"""The Ray Data runner on a real local Ray (not mocked): the local runner's records, resume, a killed node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import wait_for, wait_for_lines, with_corrupt_exif
from tests.ray_support import Cluster, kill_session, session_pids
from wanwu.config import RecognizeOptions
from wanwu.pipeline import Recognizer
from wanwu.sinks import dumps
from wanwu.sources import expand

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
WANWU = [sys.executable, "-c", "from wanwu.cli.main import run; run()"]
# A hung decode's deadline in the tests: long enough that no photo decoded beside Ray's processes on a busy
# 2-core machine reaches it (3 s did, with two CPU hogs beside the suite)
HANG_DEADLINE_S = 15.0
pytestmark = [
    pytest.mark.shared,
    pytest.mark.slow,  # each test starts Ray: tens of seconds
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\..*"),  # Ray's own, about its own settings
]


def _photo_folder(photos: Path, tmp: Path, step: int, count: int, bad: bool = True) -> Path:
    """``count`` distinct real photos (every ``step``-th), plus a truncated JPEG and a non-image."""
    folder = tmp / "in"
    folder.mkdir()
    chosen = sorted(photos.iterdir())[::step][:count]
    for p in chosen:
        os.symlink(p, folder / p.name)
    if bad:
        (folder / "zz_truncated.jpg").write_bytes(chosen[0].read_bytes()[:3000])
        (folder / "zz_notes.png").write_bytes("不是图片".encode())
    return folder


def _local(mobilenet: tuple[Path, Path], inputs: list[str]) -> list[str]:
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=RecognizeOptions(cache=False)) as rec:
        return [dumps(r) for r in rec.recognize(expand(inputs))]


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_records_equal_the_local_runners(
    local_ray: Any, mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    from wanwu.ray import RayOptions, RayRunner

    folder = _photo_folder(photos, tmp_path, step=41, count=20)
    inputs = [str(folder), str(folder / "missing.jpg")]
    expected = _local(mobilenet, inputs)
    with RayRunner(str(mobilenet[0]), labels=mobilenet[1], options=RecognizeOptions(cache=False),
                   ray_options=RayOptions(actors=2, decode_batch=4)) as runner:  # two actors: order still kept
        got = [dumps(r) for r in runner.recognize(expand(inputs))]
    assert got == expected  # same records, same input order
    kinds = Counter(json.loads(line).get("error", {}).get("type", "ok") for line in got)
    assert kinds == {"ok": 20, "decode_error": 1, "unsupported": 1, "not_found": 1}


def test_the_runner_keeps_order_across_shards_and_close_ends_an_unfinished_run(
    local_ray: Any, mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    from wanwu.ray import RayOptions, RayRunner

    folder = _photo_folder(photos, tmp_path, step=53, count=13)
    expected = _local(mobilenet, [str(folder)])
    options = RecognizeOptions(cache=False, batch_size=4)
    with RayRunner(str(mobilenet[0]), labels=mobilenet[1], options=options, shard_size=5,
                   ray_options=RayOptions(decode_batch=2)) as runner:  # three shards, one pool of actors
        assert [dumps(r) for r in runner.recognize(expand([str(folder)]))] == expected
        run = runner.recognize(expand([str(folder)]))
        assert dumps(next(run)) == expected[0]
        assert runner._stages is not None
        actors = list(runner._stages.actors)
    with pytest.raises(StopIteration):  # closed with the runner, not left to run on a Ray shut down
        next(run)
    assert ray.is_initialized()  # the caller's Ray: left open
    for actor in actors:  # the runner's actors: gone
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=60)


def test_recognize_dataset_on_read_binary_files_rows_uses_the_cache(
    local_ray: Any, mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    from wanwu.cache.sqlite import SqliteCache
    from wanwu.models import resolve_model
    from wanwu.ray import recognize_dataset

    folder = _photo_folder(photos, tmp_path, step=97, count=8)
    paths = sorted(str(p) for p in folder.iterdir())
    expected = {json.loads(line)["sha256"]: line for line in _local(mobilenet, paths)}
    cache_path = tmp_path / "cache.sqlite3"
    options = RecognizeOptions(cache_path=cache_path)
    ds = ray.data.read_binary_files(paths, include_paths=True)
    rows = recognize_dataset(ds, str(mobilenet[0]), labels=mobilenet[1], options=options).take_all()
    assert len(rows) == len(paths)
    by_sha = {}
    for row in rows:
        record = json.loads(row["record"])
        assert record["status"] == row["status"]
        assert Path(record["input"]).name in {Path(p).name for p in paths}
        by_sha[record["sha256"]] = record
    for sha, line in expected.items():  # the same record, the input aside (Ray names the path its way)
        assert {**by_sha[sha], "input": ""} == {**json.loads(line), "input": ""}
    fresh = [sha for sha, line in expected.items() if json.loads(line)["status"] == "ok"]
    namespace = resolve_model(str(mobilenet[0]), mobilenet[1]).cache_namespace()
    with SqliteCache(cache_path) as cache:  # the actors wrote every fresh result
        assert set(cache.get_many(namespace, fresh)) == set(fresh)


def test_a_decoder_that_crashes_or_hangs_costs_only_its_own_row(
    local_ray: Any, mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    from tests.ray_support import hostile_decode
    from wanwu.models import resolve_model
    from wanwu.ray import Infer, decode_batch
    from wanwu.rules import Context

    folder = _photo_folder(photos, tmp_path, step=53, count=12, bad=False)
    good = sorted(str(p) for p in folder.iterdir())
    crash, hang = folder / "crash.jpg", folder / "hang.jpg"
    crash.write_bytes(b"CRASH" + Path(good[0]).read_bytes())
    hang.write_bytes(b"HANG" + Path(good[1]).read_bytes())
    inputs = [*good[:5], str(crash), *good[5:9], str(hang), *good[9:]]
    expected = dict(zip(inputs, _local(mobilenet, inputs), strict=True))
    spec = resolve_model(str(mobilenet[0]), mobilenet[1])
    options = RecognizeOptions(cache=False, decode_timeout=HANG_DEADLINE_S, batch_size=4)
    ds = ray.data.from_items([{"input": p} for p in inputs], override_num_blocks=4)
    rows = ds.map_batches(
        decode_batch, batch_size=4, batch_format="numpy",
        fn_kwargs={"context": Context.of(spec, options), "options": options, "decode": hostile_decode},
    ).map_batches(Infer, batch_size=4, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                  fn_constructor_kwargs={"spec": spec, "options": options}).take_all()
    got = {row["input"]: json.loads(row["record"]) for row in rows}
    assert len(rows) == len(inputs) and set(got) == set(inputs)  # no row lost, none twice
    assert got[str(crash)]["error"] == {"type": "decode_error", "message": "the decoder process crashed on this file"}
    assert got[str(hang)]["error"]["type"] == "decode_error"
    assert f"took longer than {HANG_DEADLINE_S:g} s" in got[str(hang)]["error"]["message"]
    for path in good:  # the neighbours, in the same decode tasks, got their own records
        assert got[path] == json.loads(expected[path])


def _poison_keys(spec: Any, paths: list[Path]) -> frozenset[str]:
    from tests.ray_support import pixel_key
    from wanwu.imaging import prepare, to_batch

    options = RecognizeOptions()
    return frozenset(
        pixel_key(to_batch([prepare(p.read_bytes(), spec.preprocess, options.decode_options()).pixels],
                           spec.preprocess)[0])
        for p in paths
    )


def test_ray_and_local_give_the_same_records_under_every_rule(
    local_ray: Any, mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ok, repeats (in one block and across blocks), NaN scores, out of memory, a decoder crash, a decode past
    its deadline, a missing file, a non-image, and results from the cache: each rule gives the same record."""
    from tests.ray_support import PoisonBackend, hostile_decode, hostile_decode_jobs, poison_infer
    from wanwu.engine import Engine
    from wanwu.models import resolve_model
    from wanwu.ray import decode_batch, item_rows
    from wanwu.rules import Context

    folder = _photo_folder(photos, tmp_path, step=67, count=12)
    good = sorted(p for p in folder.iterdir() if not p.name.startswith("zz_"))
    (folder / "copy-a.jpg").write_bytes(good[0].read_bytes())  # beside its original: one block
    (folder / "crash.jpg").write_bytes(b"CRASH" + good[2].read_bytes())
    (folder / "hang.jpg").write_bytes(b"HANG" + good[3].read_bytes())
    inputs = [str(good[0]), str(folder / "copy-a.jpg"), *map(str, good[1:]), str(folder / "crash.jpg"),
              str(folder / "hang.jpg"), str(folder / "zz_truncated.jpg"), str(folder / "zz_notes.png"),
              str(folder / "missing.jpg"), str(good[5]), str(good[1])]  # repeats in a later block
    spec = resolve_model(str(mobilenet[0]), mobilenet[1])
    nan, oom = _poison_keys(spec, [good[7]]), _poison_keys(spec, [good[9]])
    warm = [str(p) for p in good[:4]]  # in the cache before the compared run

    def local(options: RecognizeOptions, names: list[str]) -> tuple[list[str], int]:
        engine = Engine.load(spec, None, options.backend, options.batch_size)
        engine.backend = PoisonBackend(engine.backend, nan, oom)  # type: ignore[assignment]
        with Recognizer(options=options, engine=engine) as rec:
            return [dumps(r) for r in rec.recognize(expand(names))], rec.cache_hits

    def on_ray(options: RecognizeOptions, names: list[str]) -> tuple[list[str], int]:
        ds = ray.data.from_items(item_rows(expand(names)), override_num_blocks=4)
        out = ds.map_batches(
            decode_batch, batch_size=4, batch_format="numpy",
            fn_kwargs={"context": Context.of(spec, options), "options": options, "decode": hostile_decode},
        ).map_batches(poison_infer(), batch_size=4, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                      fn_constructor_kwargs={"spec": spec, "options": options, "nan": nan, "oom": oom})
        out.context.execution_options.preserve_order = True
        rows = out.take_all()
        return [str(row["record"]) for row in rows], sum(bool(row["cached"]) for row in rows)

    monkeypatch.setattr("wanwu.pipeline._Run.decode", staticmethod(hostile_decode_jobs))
    runs = {}
    for name, run in (("local", local), ("ray", on_ray)):
        options = RecognizeOptions(cache_path=tmp_path / f"{name}.sqlite3", decode_timeout=HANG_DEADLINE_S,
                                   batch_size=4)
        run(options, warm)
        runs[name] = run(options, inputs)
    assert runs["ray"][0] == runs["local"][0]  # the same records in the same order
    records, hits = runs["local"]
    assert hits == 6  # the four warm photos, the copy of one, and a warm photo again
    # On Ray, a repeat in a later block of content first seen in this run (good[5]) is a cache hit too when the
    # batch with its first copy was inferred (and cached) before the later block was looked up.
    assert runs["ray"][1] in (6, 7)
    by_input = {json.loads(line)["input"]: json.loads(line) for line in records}
    kinds = Counter(json.loads(line).get("error", {}).get("type", "ok") for line in records)
    assert kinds == {"ok": 13, "decode_error": 3, "model_error": 2, "unsupported": 1, "not_found": 1}
    assert by_input[str(folder / "copy-a.jpg")]["predictions"] == by_input[str(good[0])]["predictions"]
    assert by_input[str(good[7])]["error"]["message"].startswith("the model returned scores that are not finite")
    # out of memory even alone: the device's state, not the file's (never too_large), and only that image's
    assert by_input[str(good[9])]["error"]["type"] == "model_error"
    assert "out of memory even for a batch of one image" in by_input[str(good[9])]["error"]["message"]


def test_the_decode_stage_decodes_repeated_content_once_per_block(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from wanwu import engine as engine_module
    from wanwu.models import resolve_model
    from wanwu.ray import Infer, decode_batch
    from wanwu.rules import Context

    chosen = sorted(photos.iterdir())[3::211][:3]
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(chosen[0].read_bytes())
    inputs = [str(chosen[0]), str(chosen[1]), str(copy), str(chosen[2]), str(copy)]
    spec = resolve_model(str(mobilenet[0]), mobilenet[1])
    options = RecognizeOptions(cache=False, decoders=0)
    decoded_sizes: list[int] = []
    inferred: list[int] = []
    real_infer = engine_module.Engine.infer

    def counting_decode(data: bytes, *args: Any) -> Any:
        from wanwu.imaging import decode_job

        decoded_sizes.append(len(data))
        return decode_job(data, *args)

    def counting_infer(engine: Any, pixels: list[Any]) -> Any:
        inferred.append(len(pixels))
        return real_infer(engine, pixels)

    monkeypatch.setattr(engine_module.Engine, "infer", counting_infer)
    rows = decode_batch({"input": np.array(inputs, dtype=object)}, context=Context.of(spec, options),
                        options=options, decode=counting_decode)
    assert len(decoded_sizes) == 3  # three distinct contents among five rows
    records = [json.loads(line) for line in Infer(spec, options)(rows)["record"]]
    assert sum(inferred) == 3
    assert [r["input"] for r in records] == inputs
    assert records[2]["predictions"] == records[4]["predictions"] == records[0]["predictions"]
    assert records == [json.loads(line) for line in _local(mobilenet, inputs)]


def _through_stages(spec: Any, options: RecognizeOptions, inputs: list[str], record: Any = None) -> list[str]:
    """The two stages called directly, in this process, as Ray would call them."""
    import numpy as np

    from wanwu.ray import Infer, decode_batch
    from wanwu.rules import Context

    decoded = decode_batch({"input": np.array(inputs, dtype=object)}, context=Context.of(spec, options),
                           options=options)
    return [str(line) for line in Infer(spec, options, record)(decoded)["record"]]


def test_the_stages_carry_decoder_warnings_like_the_local_runner(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    from wanwu.models import resolve_model

    chosen = sorted(photos.iterdir())[7::301][:3]
    odd = tmp_path / "corrupt-exif.jpg"
    odd.write_bytes(with_corrupt_exif(chosen[0].read_bytes()))  # a real photo, with a corrupt EXIF block
    inputs = [str(odd), *map(str, chosen)]
    from wanwu.ray import stages

    spec = resolve_model(str(mobilenet[0]), mobilenet[1])
    options = RecognizeOptions(cache_path=tmp_path / "cache.sqlite3")
    try:  # decoded as on Ray: in this process's decode process (the warnings are collected there)
        got = _through_stages(spec, options, inputs)
        from wanwu.ray import Infer, decode_batch
        from wanwu.rules import Context

        decoded = decode_batch({"input": np.array(inputs, dtype=object)}, context=Context.of(spec, options),
                               options=options)
        assert all(decoded["cached"]) and not any(decoded["pixels"])  # every row a cache hit this time
        again = [str(line) for line in Infer(spec, options)(decoded)["record"]]
    finally:
        stages.close_per_process()
    assert any("Corrupt EXIF" in w for w in json.loads(got[0]).get("warnings", [])), got[0]
    assert got == _local(mobilenet, inputs)  # (a short run: decoded in this process, under pytest's filters)
    assert again == got  # the cached record keeps the decoder's warnings


def test_the_stages_carry_embeddings_like_the_local_runner_cached_or_not(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    """--runner ray --embeddings: the records the two stages make carry the same embeddings as the local
    runner's, inferred and then from the cache (the decode stage's encoded hits)."""
    from wanwu.models import resolve_model
    from wanwu.ray import stages

    inputs = [str(p) for p in sorted(photos.iterdir())[5::333][:3]]
    spec = resolve_model(str(mobilenet[0]), mobilenet[1])
    options = RecognizeOptions(cache_path=tmp_path / "cache.sqlite3", decoders=0).with_embeddings()
    with Recognizer(spec, options=RecognizeOptions(cache=False, decoders=0).with_embeddings()) as rec:
        local = [dumps(r) for r in rec.recognize(inputs)]
    try:
        fresh = _through_stages(spec, options, inputs, options.record)
        cached = _through_stages(spec, options, inputs, options.record)
    finally:
        stages.close_per_process()
    assert all(len(json.loads(line)["embedding"]) == 1280 for line in local)
    assert fresh == local
    assert cached == local


@pytest.mark.extra("clip")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # transformers' lazy imports leave a file unclosed
def test_the_stages_score_a_clip_model_like_the_local_runner(photos: Path, tmp_path: Path) -> None:
    from tests.clip_helpers import CLIP_LABELS, make_clip_folder
    from wanwu.models import resolve_model
    from wanwu.records import RecordOptions

    folder = make_clip_folder(tmp_path / "tiny-chinese-clip")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLIP_LABELS) + "\n", encoding="utf-8")
    spec = resolve_model(str(folder), labels)
    inputs = [str(p) for p in sorted(photos.iterdir())[11::250][:4]]
    options = RecognizeOptions(cache=False, decoders=0)
    for score in ("softmax", "logit"):  # logit: the cosine, the logit scale divided out
        shape = RecordOptions(top_k=3, score=score)  # type: ignore[arg-type]
        with Recognizer(spec, options=options) as rec:
            local = [dumps(r) for r in rec.recognize(inputs, record=shape)]
        _same_up_to_float_noise(_through_stages(spec, options, inputs, shape), local)


def _same_up_to_float_noise(got: list[str], want: list[str]) -> None:
    """The same records, labels in the same order; scores equal but for the last bits a float32 matrix product
    may change with the batch's size (the stages split a batch over the engine's streams, the local runner
    batches as it goes): 1e-5 on a 6-decimal score."""
    assert len(got) == len(want)
    for a, b in zip(map(json.loads, got), map(json.loads, want), strict=True):
        pa, pb = a.pop("predictions"), b.pop("predictions")
        assert a == b
        assert [(p["index"], p["label"]) for p in pa] == [(p["index"], p["label"]) for p in pb]
        assert [p["score"] for p in pa] == pytest.approx([p["score"] for p in pb], abs=1e-5)


def _cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The CLI in a session of its own (so it and whatever it starts can be killed exactly); stderr to ``log``."""
    with log.open("wb") as err:
        return subprocess.Popen([*WANWU, "recognize", *args], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANWU_HOME": str(tmp_path / "home"),
            "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _one_record_each(out: Path, expected: list[str]) -> None:
    lines = out.read_text(encoding="utf-8").splitlines()
    assert Counter(json.loads(line)["input"] for line in lines) == Counter(
        json.loads(line)["input"] for line in expected
    )
    assert sorted(lines) == sorted(expected)


@pytest.mark.slow
def test_a_private_ray_run_starts_here_hands_the_rest_to_ray_and_leaves_no_process(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    # More photos than the block the driver recognizes while Ray starts (RayOptions.local_start): the rest come
    # from Ray's tasks and actor, which the processes ray.init started on its thread of its own must outlive.
    folder = _photo_folder(photos, tmp_path, step=9, count=100)
    out = tmp_path / "out.jsonl"
    env = _env(tmp_path)
    proc = _cli([str(folder), "--runner", "ray", "-m", str(mobilenet[0]), "-l", str(mobilenet[1]), "--no-cache",
                 "-q", "-o", str(out)], env, tmp_path / "driver.log")
    try:
        assert proc.wait(timeout=300) == 3, (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
        deadline = time.monotonic() + 30  # the decode processes' forkserver ends when it sees the driver gone
        while session_pids(proc.pid):
            assert time.monotonic() < deadline, "a process outlived the run"
            time.sleep(0.1)
    finally:
        kill_session(proc.pid)
    assert out.read_text(encoding="utf-8").splitlines() == _local(mobilenet, [str(folder)])  # in input order
    assert (tmp_path / "driver.log").read_text(errors="replace") == ""  # Ray's lines went aside


@pytest.mark.slow
def test_killed_driver_resumes_and_redoes_only_what_is_not_recorded(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    folder = _photo_folder(photos, tmp_path, step=6, count=150)
    out = tmp_path / "out.jsonl"
    raytmp = Path(f"/tmp/wrk{os.getpid()}")
    env = _env(tmp_path, RAY_TMPDIR=str(raytmp))
    args = [str(folder), "--runner", "ray", "-m", str(mobilenet[0]), "-l", str(mobilenet[1]), "-b", "8",
            "--no-cache", "-q", "-o", str(out)]
    try:
        proc = _cli(args, env, tmp_path / "driver.log")
        wait_for_lines(out, 10, proc, timeout=180, fail_if_exited=True)
        kill_session(proc.pid)  # SIGKILL: the driver and the local Ray it started
        proc.wait(timeout=10)
        # SIGKILLed processes are gone at once; the ones that watch for the driver's death take a moment
        wait_for(lambda: not subprocess.run(["pgrep", "-f", str(raytmp)], capture_output=True).stdout, 30,
                 "Ray's processes to go with their driver")
        before = out.read_bytes()
        done = before.count(b"\n")
        assert 10 <= done < 152
        rerun = subprocess.run([*WANWU, "recognize", *args, "--resume"], env=env, capture_output=True, timeout=300)
        assert rerun.returncode == 3, rerun.stderr.decode()[-2000:]  # two bad files: "some inputs failed"
        after = out.read_bytes()
        assert after[: before.rfind(b"\n") + 1] == before[: before.rfind(b"\n") + 1]  # recorded: kept as is
        _one_record_each(out, _local(mobilenet, [str(folder)]))
    finally:
        subprocess.run(["pkill", "-9", "-f", str(raytmp)], check=False)
        subprocess.run(["rm", "-rf", str(raytmp)], check=False)


@pytest.mark.slow
def test_a_node_killed_mid_run_costs_no_record(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    # Enough photos that the run lasts well past the moment node 2 takes its first tasks (with fewer, the head
    # alone could finish them first).
    folder = _photo_folder(photos, tmp_path, step=3, count=330)
    out = tmp_path / "out.jsonl"
    cluster = Cluster(_env(tmp_path))
    try:
        # The head keeps room for an actor and a decode task at once, so losing node 2 never leaves the
        # survivors waiting on each other for a CPU.
        cluster.start_head(num_cpus=2)
        node2 = cluster.add_node("node2", num_cpus=2)
        cluster.wait_nodes(2)
        proc = _cli([str(folder), "--runner", "ray", "--ray-address", cluster.address, "-m", str(mobilenet[0]),
                     "-l", str(mobilenet[1]), "-b", "8", "--ray-actors", "2", "--no-cache", "-q", "-o", str(out)],
                    cluster.env,
                    tmp_path / "driver.log")
        wait_for_lines(out, 10, proc, timeout=180, fail_if_exited=True)
        deadline = time.monotonic() + 60
        while not _working(node2.sid):  # kill node 2 while it runs our decode tasks or an actor
            assert proc.poll() is None and time.monotonic() < deadline, "node 2 never ran wanwu's work"
            time.sleep(0.05)
        node2.kill()
        assert session_pids(node2.sid) == []
        proc.wait(timeout=300)
        assert proc.returncode == 3, (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
        _one_record_each(out, _local(mobilenet, [str(folder)]))
    finally:
        if "proc" in locals() and proc.poll() is None:
            kill_session(proc.pid)
            proc.wait(timeout=30)
        cluster.stop()
    assert all(session_pids(node.sid) == [] for node in cluster.nodes)


@pytest.mark.slow
@pytest.mark.extra("queue")
def test_two_nodes_share_one_redis_cache_and_a_second_run_is_all_hits(
    mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path
) -> None:
    from tests.servers import redis_server

    folder = _photo_folder(photos, tmp_path, step=29, count=40)
    cluster = Cluster(_env(tmp_path))
    with redis_server(tmp_path) as url:
        try:
            cluster.start_head(num_cpus=2)
            cluster.add_node("node2", num_cpus=2)
            cluster.wait_nodes(2)
            runs = []
            for name in ("first", "second"):
                out = tmp_path / f"{name}.jsonl"
                args = [*WANWU, "recognize", str(folder), "--runner", "ray", "--ray-address", cluster.address,
                        "-m", str(mobilenet[0]), "-l", str(mobilenet[1]), "-b", "8", "--ray-actors", "2",
                        "--cache", url, "-o", str(out)]
                done = subprocess.run(args, env={**cluster.env, "COLUMNS": "200"}, capture_output=True,
                                      text=True, timeout=600)
                assert done.returncode == 3, done.stderr[-3000:]  # two bad files: "some inputs failed"
                runs.append((out.read_text(encoding="utf-8"), done.stderr))
        finally:
            cluster.stop()
    (first, first_said), (second, second_said) = runs
    assert first == second
    assert "from the cache" not in first_said
    ok = sum(1 for line in first.splitlines() if json.loads(line)["status"] == "ok")
    assert ok > 30 and f"{ok} ok" in second_said
    assert f"{ok} from the cache" in second_said, second_said[-2000:]  # every photo, on whichever node


def _working(sid: int) -> bool:
    titles = [_title(pid) for pid in session_pids(sid)]
    return any(name in t for t in titles for name in ("decode_rows", "InferActor"))


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_ray_address_without_the_ray_runner_is_a_usage_error(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    from wanwu.cli.main import main

    args = ["recognize", str(tmp_path), "-m", str(tiny_model[0]), "-l", str(tiny_model[1]), "-q",
            "-o", str(tmp_path / "out.jsonl")]
    assert main([*args, "--ray-address", "127.0.0.1:1"]) == 2
    assert main([*args, "--ray-actors", "2"]) == 2
    assert not (tmp_path / "out.jsonl").exists()
