"""``modelscope:OWNER/NAME[@REV]`` against a local HTTP server speaking ModelScope's file API."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.helpers import image_bytes
from tests.seed_helpers import SEED_LABELS, make_modelscope_folder
from wanwu.cli.main import main
from wanwu.errors import DownloadError, MissingExtraError, ModelError
from wanwu.models import DEFAULT_MODEL, resolve_model
from wanwu.seed.modelscope import MARKER, HubRef, hub_dir

MODEL = "someone/cv_tiny_general_recognition"


@dataclass
class FakeHub:
    """What the server serves and what it saw."""

    url: str = ""
    models: dict[str, dict[str, bytes]] = field(default_factory=dict)
    revisions: list[str] = field(default_factory=lambda: ["master", "v1.0"])
    listed_sha: dict[str, str] = field(default_factory=dict)  # path -> a lie about its sha256
    listed_size: dict[str, int] = field(default_factory=dict)
    ranges: bool = True
    fail_files: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    range_headers: list[str] = field(default_factory=list)
    bytes_sent: int = 0


def _handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _json(self, data: object, status: int = 200) -> None:
            body = json.dumps({"Code": status, "Data": data, "Success": status == 200}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            hub.requests.append(self.path)
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            parts = url.path.split("/")  # '', api, v1, models, owner, name, ...
            model_id = "/".join(parts[4:6])
            files = hub.models.get(model_id)
            if parts[1:4] != ["api", "v1", "models"] or files is None:
                self._json(None, 404)
                return
            rest = parts[6:]
            if rest == ["revisions"]:
                revs = [{"Revision": r} for r in hub.revisions]
                self._json({"RevisionMap": {"Branches": revs[:1], "Tags": revs[1:]}})
            elif rest == ["repo", "files"]:
                listing = [{"Name": "resources", "Path": "resources", "Type": "tree", "Size": 0}]
                for path, data in files.items():
                    listing.append({
                        "Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob",
                        "Size": hub.listed_size.get(path, len(data)),
                        "Sha256": hub.listed_sha.get(path, hashlib.sha256(data).hexdigest()),
                    })
                self._json({"Files": listing})
            elif rest == ["repo"]:
                self._file(files, query.get("FilePath", ""))
            else:
                self._json(None, 404)

        def _file(self, files: dict[str, bytes], path: str) -> None:
            if path not in files or path in hub.fail_files:
                self.send_error(404 if path not in files else 500)
                return
            data = files[path]
            start = 0
            header = self.headers.get("Range")
            if header:
                hub.range_headers.append(header)
            if header and hub.ranges:
                start = int(header.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])
            hub.bytes_sent += len(data) - start

    return Handler


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = make_modelscope_folder(tmp_path_factory.mktemp("hubsrc") / "m")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["README.md"] = "# 万物识别 tiny\n".encode()
    files["resources/demo.jpg"] = image_bytes()  # not needed: never downloaded
    return files


@pytest.fixture
def hub(model_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    state = FakeHub(models={MODEL: dict(model_files), DEFAULT_MODEL.split(":", 1)[1]: dict(model_files)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("WANWU_MODELSCOPE_ENDPOINT", state.url)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
    monkeypatch.delenv("WANWU_OFFLINE", raising=False)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_verifies_places_and_loads(hub: FakeHub, model_files: dict[str, bytes]) -> None:
    spec = resolve_model(f"modelscope:{MODEL}")
    target = hub_dir(HubRef.parse(MODEL))
    assert spec.backend == "torch" and spec.weights == target / "pytorch_model.pt"
    assert spec.labels == SEED_LABELS and spec.name == MODEL and spec.source == f"modelscope:{MODEL}"
    assert spec.weights.read_bytes() == model_files["pytorch_model.pt"]
    assert spec.weights_fingerprint == hashlib.sha256(model_files["pytorch_model.pt"]).hexdigest()
    assert (target / MARKER).is_file() and not list(target.glob("*.part"))
    assert not (target / "resources").exists()  # only what wanwu needs


def test_missing_torch_is_reported_before_any_download(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if the torch extra were not installed
    with pytest.raises(MissingExtraError) as e:
        resolve_model(DEFAULT_MODEL)
    assert hub.requests == [] and hub.bytes_sent == 0
    assert "pip install 'wanwu-vision[torch]'" in str(e.value)
    assert not hub_dir(HubRef.parse(DEFAULT_MODEL.split(":", 1)[1])).exists()


def test_second_run_makes_no_request(hub: FakeHub) -> None:
    first = resolve_model(f"modelscope:{MODEL}")
    seen = len(hub.requests)
    assert seen >= 4  # file listing + configuration, labels, README, checkpoint
    second = resolve_model(f"modelscope:{MODEL}")
    assert len(hub.requests) == seen
    assert second.weights == first.weights and second.weights_fingerprint == first.weights_fingerprint


def test_partial_download_resumes_with_range(hub: FakeHub, model_files: dict[str, bytes]) -> None:
    data = model_files["pytorch_model.pt"]
    target = hub_dir(HubRef.parse(MODEL))
    target.mkdir(parents=True)
    half = len(data) // 2
    (target / "pytorch_model.pt.part").write_bytes(data[:half])
    spec = resolve_model(f"modelscope:{MODEL}")
    assert hub.range_headers == [f"bytes={half}-"]
    assert spec.weights.read_bytes() == data
    small = sum(len(v) for k, v in model_files.items() if k != "pytorch_model.pt" and "/" not in k)
    assert hub.bytes_sent == small + len(data) - half


def test_server_without_range_support_restarts_the_file(hub: FakeHub, model_files: dict[str, bytes]) -> None:
    hub.ranges = False
    data = model_files["pytorch_model.pt"]
    target = hub_dir(HubRef.parse(MODEL))
    target.mkdir(parents=True)
    (target / "pytorch_model.pt.part").write_bytes(data[:100])
    assert resolve_model(f"modelscope:{MODEL}").weights.read_bytes() == data


def test_sha256_mismatch_is_a_download_error_and_nothing_is_kept(hub: FakeHub) -> None:
    hub.listed_sha["pytorch_model.pt"] = "0" * 64
    with pytest.raises(DownloadError, match="sha256"):
        resolve_model(f"modelscope:{MODEL}")
    target = hub_dir(HubRef.parse(MODEL))
    assert not (target / "pytorch_model.pt").exists() and not (target / "pytorch_model.pt.part").exists()
    assert not (target / MARKER).exists()


def test_size_mismatch_and_http_errors_are_download_errors(hub: FakeHub) -> None:
    hub.listed_size["meta_info.txt"] = 10**6
    with pytest.raises(DownloadError, match="bytes"):
        resolve_model(f"modelscope:{MODEL}")
    hub.listed_size.clear()
    hub.fail_files.add("pytorch_model.pt")
    with pytest.raises(DownloadError, match="HTTP 500"):
        resolve_model(f"modelscope:{MODEL}")
    with pytest.raises(DownloadError, match="not found"):
        resolve_model("modelscope:nobody/no_such_model")


def test_pinned_revision_is_checked_against_the_hub(hub: FakeHub) -> None:
    spec = resolve_model(f"modelscope:{MODEL}@v1.0")
    assert spec.weights.parent.name == "v1.0"
    assert any("Revision=v1.0" in r for r in hub.requests)
    with pytest.raises(ModelError, match=r"no revision 'v9'.*master, v1\.0"):
        resolve_model(f"modelscope:{MODEL}@v9")


def test_offline_with_absent_model_says_what_is_missing_and_how_to_get_it(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANWU_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        resolve_model(f"modelscope:{MODEL}")
    message = str(info.value)
    assert MODEL in message and "WANWU_OFFLINE" in message and "--model DIR" in message
    assert hub.requests == []


@pytest.mark.parametrize("layout", ["models/{owner}/{name}", "{owner}/{name}", "home"])
def test_existing_modelscope_cache_is_reused_without_requests(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    owner, name = MODEL.split("/")
    if layout == "home":
        monkeypatch.delenv("MODELSCOPE_CACHE")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        folder = tmp_path / "home" / ".cache" / "modelscope" / "hub" / "models" / owner / name
    else:
        folder = tmp_path / "modelscope-cache" / layout.format(owner=owner, name=name)
    make_modelscope_folder(folder, seed=5)
    spec = resolve_model(f"modelscope:{MODEL}")
    assert spec.weights == folder / "pytorch_model.pt"
    assert hub.requests == []


def test_incomplete_modelscope_cache_is_not_trusted(hub: FakeHub, tmp_path: Path) -> None:
    folder = make_modelscope_folder(tmp_path / "modelscope-cache" / "models" / MODEL)
    (folder / "meta_info.txt").unlink()
    spec = resolve_model(f"modelscope:{MODEL}")
    assert spec.weights.parent == hub_dir(HubRef.parse(MODEL)) and hub.requests


def test_bad_model_ids_are_usage_errors() -> None:
    for ref in ("modelscope:../etc", "modelscope:owner", "modelscope:a/b/c", "modelscope:a/..@x"):
        with pytest.raises(Exception, match=r"bad ModelScope id|bad revision") as info:
            resolve_model(ref)
        assert type(info.value).__name__ == "UsageError"


def test_default_model_downloads_once_then_recognizes_offline(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(image_bytes((30, 160, 220)))
    args = ["recognize", str(image), "--no-cache", "-j", "0", "-q", "-f", "jsonl", "--device", "cpu"]
    assert main(args) == 0
    online = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("WANWU_OFFLINE", "1")
    seen = len(hub.requests)
    assert main(args) == 0
    offline = json.loads(capsys.readouterr().out)
    assert len(hub.requests) == seen
    assert online["status"] == "ok" and online == offline


@pytest.mark.extra("clip")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # transformers' lazy imports leave a file unclosed
def test_a_chinese_clip_repository_in_hugging_face_layout_downloads_and_loads(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Chinese users reach ModelScope more easily than Hugging Face: a ModelScope repository holding a
    Chinese-CLIP checkpoint in Hugging Face layout is a modelscope: id like the seed model."""
    from tests.clip_helpers import CLIP_LABELS, make_clip_folder

    folder = make_clip_folder(tmp_path / "tiny-chinese-clip")
    labels = tmp_path / "mine.txt"
    labels.write_text("\n".join(CLIP_LABELS) + "\n", encoding="utf-8")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["README.md"] = b"# Chinese-CLIP tiny\n"
    files["resources/demo.jpg"] = image_bytes()  # not needed: never downloaded
    hub.models["someone/tiny-chinese-clip"] = files
    spec = resolve_model("modelscope:someone/tiny-chinese-clip", labels)
    local = hub_dir(HubRef.parse("someone/tiny-chinese-clip"))
    assert spec.arch == "chinese_clip" and spec.weights == local and spec.labels == CLIP_LABELS
    assert spec.source == "modelscope:someone/tiny-chinese-clip"
    assert spec.weights_fingerprint == resolve_model(str(folder), labels).weights_fingerprint
    assert (local / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (local / "resources").exists()
    requests = len(hub.requests)
    assert resolve_model("modelscope:someone/tiny-chinese-clip", labels).weights == local
    assert len(hub.requests) == requests  # downloaded once

    hub.models["someone/broken-clip"] = {k: v for k, v in files.items() if k != "vocab.txt"}
    with pytest.raises(ModelError, match=r"vocab\.txt"):
        resolve_model("modelscope:someone/broken-clip", labels)
