"""Search: build an :class:`~wanwu.index.ImageIndex` with a :class:`~wanwu.pipeline.Recognizer`, query it by
text (models with a text tower) or by photos, and find near-duplicates.

Everything goes through the one orchestrator: inputs are embedded by ``Recognizer.recognize`` (all input
kinds, the result cache, in-run dedupe), so a library indexed again costs only what is new.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wanwu.config import RecognizeOptions
from wanwu.engine import Engine
from wanwu.errors import IndexFolderError, UsageError
from wanwu.index import Hit, ImageIndex, IndexRow
from wanwu.pipeline import InputLike, Recognizer
from wanwu.records import Record, RecordOptions

COMMIT_EVERY = 256  # rows per commit while indexing: a kill loses at most these
STORED_LABELS = 3


def embedding_options(options: RecognizeOptions, embedding_output: str | None = None) -> RecognizeOptions:
    """``options`` with embeddings switched on (and their cache namespace)."""
    return options.with_embeddings(embedding_output)


def index_key(recognizer: Recognizer) -> str:
    """What an index records about the model that made it: weights, preprocessing, embedding tensor."""
    return recognizer.options.cache_namespace(recognizer.spec)


@dataclass
class IndexReport:
    added: int = 0
    present: int = 0  # content already in the index
    failed: list[Record] = field(default_factory=list)


def build_index(
    recognizer: Recognizer, folder: Path | str, inputs: Iterable[InputLike], commit_every: int = COMMIT_EVERY
) -> IndexReport:
    """Embed ``inputs`` and add what is new (by content) to the index in ``folder``, made if new."""
    _require_embeddings(recognizer)
    report = IndexReport()
    index: ImageIndex | None = None
    if (Path(folder) / "index.json").exists():
        index = ImageIndex.open(folder, index_key(recognizer))
    rows: list[IndexRow] = []
    vectors: list[npt.NDArray[np.float32]] = []
    shape = RecordOptions(top_k=min(STORED_LABELS, recognizer.spec.num_classes), embeddings=True)
    for record in recognizer.recognize(inputs, shape):
        if not record.ok or record.embedding is None or record.sha256 is None:
            report.failed.append(record)
            continue
        if index is None:
            index = ImageIndex.open_or_create(folder, index_key(recognizer), len(record.embedding), _info(recognizer))
        if record.sha256 in index:
            report.present += 1
            continue
        rows.append(IndexRow(record.input, record.sha256, tuple(p.label for p in record.predictions)))
        vectors.append(record.embedding)
        if len(rows) >= commit_every:
            report.added += index.add(rows, np.stack(vectors))
            rows, vectors = [], []
    if index is not None and rows:
        added = index.add(rows, np.stack(vectors))
        report.present += len(rows) - added
        report.added += added
    if index is not None:
        index.ann(tail=0)  # from ANN_FROM_ROWS rows on: the ANN built, or extended to the new rows
    return report


def _info(recognizer: Recognizer) -> dict[str, Any]:
    source = recognizer.engine.embedding_source
    spec = recognizer.spec
    return {"model_name": spec.name, "model_source": str(spec.source) if spec.source else None,
            "embedding": source.describe() if source else None}


def _require_embeddings(recognizer: Recognizer) -> None:
    if recognizer.engine.embedding_source is None:
        raise UsageError("this recognizer gives no embeddings: load it with embedding_options(...)")


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One query's answer: hits, or an error (a query photo that cannot be read)."""

    query: str
    hits: tuple[Hit, ...] = ()
    error: tuple[str, str] | None = None

    def to_dict(self, index: ImageIndex) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": {"type": self.error[0], "message": self.error[1]}}
        results = []
        for hit in self.hits:
            row = index.rows[hit.row]
            item: dict[str, Any] = {"input": row.input, "score": round(hit.score, 6), "sha256": row.sha256}
            if row.labels:
                item["labels"] = list(row.labels)
            results.append(item)
        return {"query": self.query, "results": results}


def search_images(
    recognizer: Recognizer, index: ImageIndex, inputs: Iterable[InputLike], k: int = 10,
    threshold: float | None = None,
) -> Iterator[SearchResult]:
    """Each query photo's ``k`` nearest rows; a photo that cannot be read gets an error result."""
    _check_model(recognizer, index)
    for record in recognizer.recognize(inputs, QUERY_RECORD):
        yield answer_record(index, record, k, threshold)


QUERY_RECORD = RecordOptions(top_k=1, embeddings=True)  # what a query photo's record needs


def answer_record(index: ImageIndex, record: Record, k: int = 10, threshold: float | None = None) -> SearchResult:
    """The answer to one query photo's record (:data:`QUERY_RECORD`): its hits, or its error."""
    if not record.ok or record.embedding is None:
        err = record.error
        return SearchResult(record.input, error=(err.type, err.message) if err else ("internal", "no embedding"))
    (hits,) = index.search(record.embedding[None, :], k, threshold)
    return SearchResult(record.input, tuple(hits))


def search_texts(
    recognizer: Recognizer, index: ImageIndex, texts: list[str], k: int = 10, threshold: float | None = None,
) -> list[SearchResult]:
    """Each text's ``k`` nearest rows, by the model's text tower (Chinese-CLIP)."""
    _check_model(recognizer, index)
    return answer_texts(recognizer.engine, index, texts, k, threshold)


def answer_texts(
    engine: Engine, index: ImageIndex, texts: list[str], k: int = 10, threshold: float | None = None,
) -> list[SearchResult]:
    """Each text's hits by ``engine``'s text tower; :class:`UsageError` for a model without one."""
    embed = getattr(engine.backend, "embed_texts", None)
    if embed is None:
        raise UsageError("this model has no text tower: search by --image, or index with a Chinese-CLIP model")
    queries = np.asarray(embed(texts), dtype=np.float32)
    return [SearchResult(text, tuple(hits)) for text, hits in zip(texts, index.search(queries, k, threshold),
                                                                  strict=True)]


def _check_model(recognizer: Recognizer, index: ImageIndex) -> None:
    _require_embeddings(recognizer)
    if index.model != index_key(recognizer):
        raise IndexFolderError(
            f"{index.folder} was made by another model or preprocessing ({index.model}), not {index_key(recognizer)}"
        )


def dedupe(index: ImageIndex, threshold: float = 0.95) -> Iterator[dict[str, Any]]:
    """Groups of near-duplicates, one dict per group: its inputs and their cosine to the group's first row."""
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be a cosine between -1 and 1, got {threshold}")
    vectors = index.vectors
    for group in index.duplicates(threshold):
        first = np.asarray(vectors[group[0]], dtype=np.float32)
        scores = np.asarray(vectors[group], dtype=np.float32) @ first
        yield {"inputs": [index.rows[i].input for i in group], "scores": [round(float(s), 6) for s in scores]}


def open_recognizer(model: str | None, options: RecognizeOptions, embedding_output: str | None = None,
                    labels: Path | None = None) -> Recognizer:
    """A recognizer that gives embeddings."""
    return Recognizer(model, labels=labels, options=embedding_options(options, embedding_output))


__all__ = ["QUERY_RECORD", "IndexReport", "SearchResult", "answer_record", "answer_texts", "build_index", "dedupe",
           "embedding_options", "index_key", "open_recognizer", "search_images", "search_texts"]
