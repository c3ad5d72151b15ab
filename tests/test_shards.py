"""WebDataset shards and URL tables as input, on shards written by the real img2dataset.

img2dataset downloads distinct real photos from a loopback HTTP server into tar shards (with
``--disable_all_reencoding``, so each sample holds the photo's own bytes); wanwu must give each sample the
record the photo file gets, in shard order, named ``SHARD#MEMBER``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.servers import static_server
from tests.test_s3 import s3  # noqa: F401  (the fixture: a moto S3 server)
from wanwu.cli.main import main
from wanwu.shards import braces

N_PHOTOS = 12


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(mobilenet: tuple[Path, Path], *args: str) -> int:
    return main(["recognize", *args, "--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "-q",
                 "--no-cache", "-j", "0"])


def _by_sha(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {r["sha256"]: r["predictions"] for r in records if r["status"] == "ok"}


@pytest.fixture(scope="module")
def served(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("served")
    for path in sorted(photos.glob("*.JPEG"))[:N_PHOTOS]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def shards(served: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards of up to 5 samples each, written by img2dataset (one URL is dead: no sample for it)."""
    pytest.importorskip("img2dataset", reason="img2dataset (the dev extra) is not installed")
    out = tmp_path_factory.mktemp("shards")
    with static_server(served) as base:
        urls = [f"{base}/{p.name}" for p in sorted(served.iterdir())]
        urls.insert(3, f"{base}/missing.jpg")
        (out / "urls.txt").write_text("\n".join(urls) + "\n")
        run = subprocess.run(
            [str(Path(sys.executable).with_name("img2dataset")), "--url_list", str(out / "urls.txt"),
             "--input_format", "txt", "--output_format", "webdataset", "--output_folder", str(out / "ds"),
             "--resize_mode", "no",
             "--disable_all_reencoding", "True", "--enable_wandb", "False", "--processes_count", "1",
             "--thread_count", "4", "--number_sample_per_shard", "5"],
            capture_output=True, text=True, timeout=300, cwd=out,
            env={**os.environ, "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"},
        )
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "ds"


def test_each_image_sample_gets_the_records_of_its_photo(
    shards: Path, served: Path, mobilenet: tuple[Path, Path], tmp_path: Path
) -> None:
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) >= 2
    assert _run(mobilenet, str(served), "-o", str(tmp_path / "files.jsonl")) == 0
    pattern = str(shards / f"{{00000..{len(tars) - 1:05d}}}.tar")
    assert _run(mobilenet, pattern, "-o", str(tmp_path / "shards.jsonl")) == 0
    got = _records(tmp_path / "shards.jsonl")
    assert len(got) == N_PHOTOS  # the dead URL has no sample; .json/.txt members give no records
    expected_names = []
    for tar in tars:
        with tarfile.open(tar) as t:
            expected_names += [f"{tar}#{m.name}" for m in t.getmembers() if m.name.endswith(".jpg")]
    assert [r["input"] for r in got] == expected_names  # shard order, SHARD#MEMBER
    assert _by_sha(got) == _by_sha(_records(tmp_path / "files.jsonl"))
    assert "meta" not in got[0]


def test_with_meta_carries_the_samples_json(shards: Path, served: Path, mobilenet: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    assert _run(mobilenet, str(shards / "*.tar"), "--with-meta", "-o", str(tmp_path / "m.jsonl")) == 0
    for record in _records(tmp_path / "m.jsonl"):
        meta = record["meta"]
        assert meta["status"] == "success" and meta["url"].endswith(".JPEG")
        assert meta["sha256"] == record["sha256"]
        assert record["input"].endswith(f"#{meta['key']}.jpg")
    assert _run(mobilenet, str(shards / "00000.tar"), "--with-meta", "-o", str(tmp_path / "m.csv")) == 0
    header = (tmp_path / "m.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[-1] == "meta"


def test_a_truncated_shard_keeps_the_samples_before_the_break(
    shards: Path, mobilenet: tuple[Path, Path], tmp_path: Path
) -> None:
    whole = (shards / "00000.tar").read_bytes()
    with tarfile.open(shards / "00000.tar") as t:
        members = t.getmembers()
    third_image = [m for m in members if m.name.endswith(".jpg")][2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: third_image.offset_data + 1000])  # inside the third photo's data
    assert _run(mobilenet, str(cut), "-o", str(tmp_path / "cut.jsonl")) == 3
    got = _records(tmp_path / "cut.jsonl")
    assert [r["status"] for r in got] == ["ok", "ok", "error"]
    assert got[-1]["input"] == str(cut)
    assert "truncated" in got[-1]["error"]["message"] and "after member" in got[-1]["error"]["message"]


def test_broken_samples_and_odd_members(tmp_path: Path, photos: Path, mobilenet: tuple[Path, Path]) -> None:
    """A sample whose image is broken gets its error record; other members are ignored; a member above
    --max-bytes is skipped unread with a too_large record."""
    real = sorted(photos.glob("*.JPEG"))[:2]
    shard = tmp_path / "hand.tar"
    with tarfile.open(shard, "w") as t:
        for name, data in [("a/0001.jpg", real[0].read_bytes()), ("a/0001.txt", b"caption"),
                           ("a/0002.jpg", real[0].read_bytes()[:3000]), ("a/0002.cls", b"7"),
                           ("a/0003.png", real[1].read_bytes() * 40), ("README", b"hello")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert _run(mobilenet, str(shard), "--max-bytes", str(len(real[1].read_bytes()) * 20),
                "-o", str(tmp_path / "o.jsonl")) == 3
    got = _records(tmp_path / "o.jsonl")
    assert [(r["input"].split("#")[1], r["status"]) for r in got] == [
        ("a/0001.jpg", "ok"), ("a/0002.jpg", "error"), ("a/0003.png", "error")]
    assert got[1]["error"]["type"] == "decode_error" and got[2]["error"]["type"] == "too_large"


def test_resume_and_cache_work_per_sample(shards: Path, mobilenet: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    args = [str(shards / "*.tar"), "--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "-q", "-j", "0",
            "-o", str(out)]
    assert main(["recognize", *args]) == 0
    whole = out.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(whole[:4]) + "\n", encoding="utf-8")  # as if killed after 4 records
    assert main(["recognize", *args, "--resume"]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == whole


def test_braces_expand_like_webdataset() -> None:
    assert list(braces("s/{00008..00011}.tar")) == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert list(braces("{a,b}/{1..2}.tar")) == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert list(braces("plain.tar")) == ["plain.tar"]


# --- URL tables ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv"])
def test_url_tables_give_one_record_per_row_in_row_order(
    served: Path, mobilenet: tuple[Path, Path], tmp_path: Path, suffix: str
) -> None:
    names = sorted(p.name for p in served.iterdir())[:5]
    with static_server(served) as base:
        rows = [{"link": f"{base}/{n}", "caption": f"第{i}张"} for i, n in enumerate(names)]
        rows.insert(2, {"link": "", "caption": "空"})
        rows.append({"link": str(served / names[0]), "caption": "本地路径"})
        table = tmp_path / f"urls{suffix}"
        _write_table(table, rows)
        assert _run(mobilenet, str(table), "--url-column", "link", "--keep-columns", "caption",
                    "--allow-private-urls", "-o", str(tmp_path / "t.jsonl")) == 3
    got = _records(tmp_path / "t.jsonl")
    assert len(got) == len(rows)
    assert [r["meta"]["caption"] for r in got] == [row["caption"] for row in rows]
    assert got[2]["status"] == "error" and "row 3" in got[2]["error"]["message"]
    ok = [r for r in got if r["status"] == "ok"]
    assert len(ok) == 6 and ok[0]["input"] == rows[0]["link"]
    assert ok[-1]["sha256"] == ok[0]["sha256"]  # the local path is the first photo again


def test_a_table_without_the_column_says_so(tmp_path: Path, mobilenet: tuple[Path, Path]) -> None:
    table = tmp_path / "t.csv"
    table.write_text("address,caption\nhttp://example.com/a.jpg,x\n", encoding="utf-8")
    assert _run(mobilenet, str(table), "-o", str(tmp_path / "o.jsonl")) == 3
    (record,) = _records(tmp_path / "o.jsonl")
    assert "no column 'url'" in record["error"]["message"] and "--url-column" in record["error"]["message"]


def _write_table(path: Path, rows: list[dict[str, str]]) -> None:
    if path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow", reason="the parquet extra is not installed")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    sep = "\t" if path.suffix == ".tsv" else ","
    lines = [sep.join(rows[0])] + [sep.join(r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\..*")
def test_the_ray_runner_reads_each_shard_in_a_task_with_the_local_records(
    shards: Path, served: Path, mobilenet: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray", reason="the cluster extra is not installed")
    from wanwu import shards as shards_module
    from wanwu.config import RecognizeOptions
    from wanwu.pipeline import Recognizer
    from wanwu.ray import RayOptions, RayRunner
    from wanwu.sinks import dumps
    from wanwu.sources import SourceOptions, expand

    photo = str(sorted(served.iterdir())[0])
    inputs = [str(shards / "00001.tar"), photo, str(shards / "{00000..00002}.tar")]
    options = RecognizeOptions(cache=False, decoders=0)
    with_meta = SourceOptions(with_meta=True)  # each sample's .json rides along into its record, on Ray too
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=options) as rec:
        expected = [dumps(r) for r in rec.recognize(expand(inputs, options=with_meta))]
    assert sum('"meta":' in line for line in expected) == len(expected) - 1  # all but the plain photo

    def not_on_the_driver(*args: object, **kwargs: object) -> None:
        raise AssertionError("a shard was read on the driver")

    monkeypatch.setattr(shards_module, "read_shard", not_on_the_driver)  # Ray's workers import their own
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayRunner(str(mobilenet[0]), labels=mobilenet[1], options=options,
                       ray_options=RayOptions(decode_batch=4), sources=with_meta) as runner:
            deferred = SourceOptions(with_meta=True, defer_shards=True)
            got = [dumps(r) for r in runner.recognize(expand(inputs, options=deferred))]
    finally:
        ray.shutdown()
    assert got == expected and len(got) > N_PHOTOS + 1  # shard 1 twice, the photo, every sample


def test_shards_on_s3_give_the_records_of_local_shards(
    s3: Any, shards: Path, mobilenet: tuple[Path, Path], tmp_path: Path  # noqa: F811 (the fixture)
) -> None:
    s3.create_bucket(Bucket="data")
    for tar in sorted(shards.glob("*.tar")):
        s3.put_object(Bucket="data", Key=f"ds/{tar.name}", Body=tar.read_bytes())
    s3.put_object(Bucket="data", Key="ds/bad.tar", Body=b"this is not a tar file at all" * 40)
    assert _run(mobilenet, str(shards / "{00000..00001}.tar"), "-o", str(tmp_path / "local.jsonl")) == 0
    assert _run(mobilenet, "s3://data/ds/{00000..00001}.tar", "s3://data/ds/bad.tar", "s3://data/ds/gone.tar",
                "-o", str(tmp_path / "s3.jsonl")) == 3
    local, remote = _records(tmp_path / "local.jsonl"), _records(tmp_path / "s3.jsonl")
    assert [r["input"].replace(str(shards), "s3://data/ds") for r in local] == [r["input"] for r in remote[:-2]]
    assert [r["predictions"] for r in local] == [r["predictions"] for r in remote[:-2]]
    assert remote[-2]["input"] == "s3://data/ds/bad.tar" and remote[-2]["error"]["type"] == "decode_error"
    assert remote[-1]["input"] == "s3://data/ds/gone.tar" and remote[-1]["error"]["type"] == "not_found"


def test_a_job_takes_a_shard_as_its_samples(shards: Path, tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    from tests.jobs_support import work
    from wanwu.jobs.base import open_queue

    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    shard = str(shards / "00000.tar")
    assert main(["jobs", "submit", shard, "--by-reference", "--queue", url, "--task-size", "2"]) == 0
    queue = open_queue(url)
    try:
        work(queue, tiny_model)
        (job,) = queue.jobs()
        records = list(queue.results(job.id))
    finally:
        queue.close()
    with tarfile.open(shard) as t:
        names = [f"{shard}#{m.name}" for m in t.getmembers() if m.name.endswith(".jpg")]
    assert [r.input for r in records] == names and all(r.ok for r in records)
