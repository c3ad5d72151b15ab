"""s3:// inputs against a real S3-compatible server (moto in server mode on a free port), not a mocked client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from wanwu import objstore
from wanwu.cli.main import main

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "wanwu-test", "AWS_SECRET_ACCESS_KEY": "secret",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    objstore._cache.clear()
    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        yield client
    finally:
        objstore._cache.clear()
        server.stop()


def _records(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def _run(mobilenet: tuple[Path, Path], *args: str) -> int:
    return main(["recognize", *args, "--model", str(mobilenet[0]), "--labels", str(mobilenet[1]), "-q",
                 "--no-cache", "-f", "jsonl"])


def test_prefix_is_read_like_a_folder(s3: object, tmp_path: Path, mobilenet: tuple[Path, Path], photos: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    client = s3
    local = sorted(photos.glob("*.JPEG"))[:5]
    client.create_bucket(Bucket="cat")  # type: ignore[attr-defined]
    keys = ["set/a/" + local[0].name, "set/a/" + local[1].name, "set/b/" + local[2].name, "set/" + local[3].name]
    for key, path in zip(keys, local, strict=False):
        client.put_object(Bucket="cat", Key=key, Body=path.read_bytes())  # type: ignore[attr-defined]
    client.put_object(Bucket="cat", Key="set/notes.txt", Body=b"not an image")  # type: ignore[attr-defined]
    client.put_object(Bucket="cat", Key="set/broken.jpg", Body=local[4].read_bytes()[:3000])  # type: ignore[attr-defined]
    client.put_object(Bucket="cat", Key="other/x.jpg", Body=local[4].read_bytes())  # type: ignore[attr-defined]

    assert _run(mobilenet, *(str(p) for p in local[:4]), "-o", str(tmp_path / "ref.jsonl")) == 0
    ref = _records((tmp_path / "ref.jsonl").read_text())
    expected = {Path(str(r["input"])).name: r for r in ref}

    assert _run(mobilenet, "s3://cat/set/", "s3://cat/other/x.jpg", "s3://cat/set/gone.jpg",
                "s3://nobucket/x/") == 3
    records = _records(capsys.readouterr().out)
    by_input = {r["input"]: r for r in records}
    assert len(records) == 8  # 4 photos + broken under the prefix (not notes.txt), x.jpg, gone.jpg, nobucket
    for key in keys:
        got, want = by_input[f"s3://cat/{key}"], expected[Path(key).name]
        assert got["status"] == "ok"
        assert got["predictions"] == want["predictions"] and got["sha256"] == want["sha256"]
    assert by_input["s3://cat/other/x.jpg"]["status"] == "ok"
    assert by_input["s3://cat/set/broken.jpg"]["error"]["type"] == "decode_error"  # type: ignore[index]
    assert by_input["s3://cat/set/gone.jpg"]["error"]["type"] == "not_found"  # type: ignore[index]
    assert by_input["s3://nobucket/x/"]["status"] == "error"
    assert "s3://cat/set/notes.txt" not in by_input


def test_a_missing_bucket_a_missing_key_and_an_imageless_prefix_say_which(
        s3: object, mobilenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    s3.create_bucket(Bucket="cat")  # type: ignore[attr-defined]
    s3.put_object(Bucket="cat", Key="docs/readme.txt", Body=b"not an image")  # type: ignore[attr-defined]
    args = ["s3://nobucket/x/", "s3://cat/missing/", "s3://cat/missing.jpg", "s3://cat/docs/"]
    assert _run(mobilenet, *args) == 3
    said = {r["input"]: r["error"]["message"] for r in _records(capsys.readouterr().out)}  # type: ignore[index]
    assert said == {
        "s3://nobucket/x/": "no such bucket: nobucket",
        "s3://cat/missing/": "no object or prefix 'missing/' in bucket cat",
        "s3://cat/missing.jpg": "no object or prefix 'missing.jpg' in bucket cat",
        "s3://cat/docs/": "no image objects under this prefix",
    }


def test_unreachable_endpoint_is_an_error_record(s3: object, mobilenet: tuple[Path, Path], photos: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    s3.create_bucket(Bucket="cat")  # type: ignore[attr-defined]
    photo = sorted(photos.glob("*.JPEG"))[0]
    s3.put_object(Bucket="cat", Key="p.jpg", Body=photo.read_bytes())  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    objstore._cache.clear()
    assert _run(mobilenet, "s3://cat/p.jpg", "--timeout", "5") == 3
    (record,) = _records(capsys.readouterr().out)
    assert record["status"] == "error" and record["input"] == "s3://cat/p.jpg"
    assert record["error"]["type"] == "fetch_error"  # type: ignore[index]


def test_jobs_submit_uploads_objects_even_by_reference(s3: object, photos: Path) -> None:
    """A worker cannot read s3:// as a path: the submitter reads the object and uploads its bytes."""
    from wanwu.jobs.inputs import job_inputs

    photo = sorted(photos.glob("*.JPEG"))[1]
    s3.create_bucket(Bucket="cat")  # type: ignore[attr-defined]
    s3.put_object(Bucket="cat", Key="p.jpg", Body=photo.read_bytes())  # type: ignore[attr-defined]
    (job_input,) = job_inputs(["s3://cat/p.jpg"], by_reference=True)
    assert (job_input.name, job_input.kind, job_input.data) == ("s3://cat/p.jpg", "upload", photo.read_bytes())


def test_unchanged_objects_are_not_downloaded_and_an_overwritten_one_is(
    s3: object, mobilenet: tuple[Path, Path], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing's size and ETag say an object is unchanged (no download); an overwrite changes its ETag."""
    import hashlib

    import wanwu.fetch
    from wanwu.config import RecognizeOptions
    from wanwu.pipeline import Recognizer

    client = s3
    local = sorted(photos.glob("*.JPEG"))[:3]
    client.create_bucket(Bucket="nightly")  # type: ignore[attr-defined]
    for path in local[:2]:
        client.put_object(Bucket="nightly", Key=f"set/{path.name}", Body=path.read_bytes())  # type: ignore[attr-defined]
    downloads: list[str] = []
    original = wanwu.fetch.Fetcher.fetch

    def fetch(fetcher: object, item: object, known: object = None) -> object:
        downloads.append(item.input)  # type: ignore[attr-defined]
        return original(fetcher, item, known)  # type: ignore[arg-type]

    monkeypatch.setattr(wanwu.fetch.Fetcher, "fetch", fetch)
    opts = RecognizeOptions(decoders=0, cache_path=tmp_path / "c.sqlite3")
    with Recognizer(str(mobilenet[0]), labels=mobilenet[1], options=opts) as rec:
        first = [r.to_dict() for r in rec.recognize(["s3://nightly/set/", f"s3://nightly/set/{local[0].name}"])]
        assert len(downloads) == 3 and rec.unchanged == 0
        downloads.clear()
        again = [r.to_dict() for r in rec.recognize(["s3://nightly/set/", f"s3://nightly/set/{local[0].name}"])]
        assert again == first and not downloads and rec.unchanged == 3  # nothing downloaded
        # Overwritten with another photo: a new ETag. Its record must be the new photo's.
        client.put_object(Bucket="nightly", Key=f"set/{local[1].name}", Body=local[2].read_bytes())  # type: ignore[attr-defined]
        records = [r.to_dict() for r in rec.recognize(["s3://nightly/set/"])]
        assert downloads == [f"s3://nightly/set/{local[1].name}"] and rec.unchanged == 4
        assert records[0] == first[0]
        assert records[1]["sha256"] == hashlib.sha256(local[2].read_bytes()).hexdigest()
        assert records[1]["predictions"] != first[1]["predictions"]
