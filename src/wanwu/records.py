"""Records: exactly one per input, ``ok`` with predictions or ``error`` with a reason.

The model's output for one image is kept as :class:`TopScores` (the top-N raw scores plus the
log-sum-exp over all classes), enough to answer any top-k <= N with softmax or logit scores, exactly.
This is also what the result cache stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from wanwu.errors import ErrorType, UsageError

if TYPE_CHECKING:
    from wanwu.spec import ModelSpec

ScoreKind = Literal["softmax", "logit"]
TOP_N_STORED = 50


@dataclass(frozen=True, slots=True)
class RecordOptions:
    """What each record carries: the top ``top_k`` labels, scored as ``score``, down to ``threshold``.

    The one place these are checked. It is passed per call (``Recognizer.recognize(inputs, record=...)``,
    a service request, a job), since it only shapes records: the model and the cache do not depend on it.
    """

    top_k: int = 5
    score: ScoreKind = "softmax"
    threshold: float | None = None
    scores: bool = False  # also the model's whole score row (Record.scores; never cached, never serialized)
    embeddings: bool = False  # also the image's embedding (Record.embedding), from a recognizer that embeds

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= TOP_N_STORED:
            raise UsageError(f"top_k must be an integer between 1 and {TOP_N_STORED}, got {self.top_k!r}")
        if self.score not in ("softmax", "logit"):
            raise UsageError(f"score must be 'softmax' or 'logit', got {self.score!r}")
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
            or not math.isfinite(self.threshold)
        ):
            raise UsageError(f"threshold must be a finite number, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"top_k": self.top_k, "score": self.score, "threshold": self.threshold}
        if self.embeddings:
            out["embeddings"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecordOptions:
        return cls(data.get("top_k", 5), data.get("score", "softmax"), data.get("threshold"),
                   embeddings=bool(data.get("embeddings", False)))


@dataclass(slots=True)
class Prediction:
    """One label of a record (not frozen: a frozen dataclass costs three times as much to build, and a rerun
    answered from the cache builds tens of thousands a second)."""

    index: int
    label: str
    score: float
    label_en: str | None = None  # the English name, when the label file has an ``en`` column

    def to_dict(self) -> dict[str, Any]:
        if self.label_en is None:
            return {"index": self.index, "label": self.label, "score": self.score}
        return {"index": self.index, "label": self.label, "label_en": self.label_en, "score": self.score}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: ErrorType
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message}


@dataclass(slots=True)
class TopScores:
    """Top-N raw outputs of one image, best first, and logsumexp of all of them (for softmax). Treated as
    immutable (caches share it), but not frozen: a frozen dataclass costs three times as much to build, and a
    rerun answered from the cache builds tens of thousands a second."""

    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float32]
    logsumexp: float
    row: npt.NDArray[np.float32] | None = None  # every class's raw score, where the inference keeps them
    embedding: npt.NDArray[np.float32] | None = None  # the image's L2-normalised embedding, when asked for

    def without_row(self) -> TopScores:
        """What the caches keep: the top-N, the logsumexp and the embedding (when there is one)."""
        return self if self.row is None else TopScores(self.indices, self.values, self.logsumexp, None, self.embedding)

    def predictions(
        self, labels: tuple[str, ...], top_k: int, score: ScoreKind, threshold: float | None = None,
        *, probabilities: bool = False, labels_en: tuple[str, ...] = (), logit_scale: float = 1.0,
    ) -> list[Prediction]:
        """``probabilities``: the model already outputs probabilities (then softmax = the values).
        ``labels_en``: English names by class, carried as ``label_en`` (empty: none). ``logit_scale``: the
        model's outputs are ``logit_scale * cosine`` (CLIP); a ``logit`` score is then the cosine."""
        out: list[Prediction] = []
        values: list[float] = self.values[:top_k].tolist()  # float32 -> float64, exactly
        if score == "logit" or probabilities:
            scores = [v / logit_scale for v in values] if logit_scale != 1.0 else values
        else:
            lse = self.logsumexp
            scores = [math.exp(v - lse) for v in values]
        indices: list[int] = self.indices[:top_k].tolist()
        if threshold is None and not labels_en:
            return [Prediction(i, labels[i], round(s, 6)) for i, s in zip(indices, scores, strict=True)]
        for idx, s in zip(indices, scores, strict=True):
            if threshold is not None and s < threshold:
                break
            out.append(Prediction(idx, labels[idx], round(s, 6), labels_en[idx] if labels_en else None))
        return out


def top_scores(outputs: npt.NDArray[np.float32], n: int = TOP_N_STORED, keep_rows: bool = False) -> list[TopScores]:
    """Split a [B, C] batch of scores into per-image :class:`TopScores` (``keep_rows``: each with a copy of its
    whole row, for callers that ask for every class's score)."""
    outputs = np.asarray(outputs, dtype=np.float32)
    n = min(n, outputs.shape[1])
    part = np.argpartition(-outputs, n - 1, axis=1)[:, :n] if n < outputs.shape[1] else None
    peak = outputs.max(axis=1, keepdims=True).astype(np.float64)
    lse = (peak[:, 0] + np.log(np.exp(outputs - peak).sum(axis=1))).tolist()
    result = []
    for i, row in enumerate(outputs):
        cand = part[i] if part is not None else np.arange(outputs.shape[1])
        order = cand[np.lexsort((cand, -row[cand]))]  # by score desc, ties by index
        kept = row.copy() if keep_rows else None
        result.append(TopScores(order.astype(np.int32), row[order].astype(np.float32), float(lse[i]), kept))
    return result


def from_top(
    indices: npt.NDArray[np.integer[Any]], values: npt.NDArray[np.floating[Any]],
    logsumexp: npt.NDArray[np.floating[Any]],
) -> list[TopScores]:
    """Per-image :class:`TopScores` from a backend that ranked on its device, ordered as :func:`top_scores`
    orders them (by score, ties by index), whatever order the device's top-k left ties in."""
    result = []
    for idx, row, lse in zip(indices, values, logsumexp, strict=True):
        order = np.lexsort((idx, -row))
        result.append(TopScores(idx[order].astype(np.int32), row[order].astype(np.float32), float(lse)))
    return result


class RecordStream(Iterator["Record"]):
    """The records of one run, in input order; :meth:`ready`: the next one is there already (a writer
    flushes its output when it is not)."""

    def __init__(self, records: Generator[Record, None, None], ready: Callable[[], bool]) -> None:
        self._records = records
        self.ready = ready

    def __next__(self) -> Record:
        return next(self._records)

    def close(self) -> None:
        self._records.close()


@dataclass(slots=True)
class Record:
    input: str
    status: Literal["ok", "error"]
    predictions: list[Prediction] = field(default_factory=list)
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    error: ErrorInfo | None = None
    warnings: tuple[str, ...] = ()  # what the decoder said about this file (a corrupt EXIF block, …)
    scores: npt.NDArray[np.float32] | None = None  # every class's raw score, when RecordOptions.scores asked
    meta: dict[str, Any] | None = None  # what rode along with the input (a shard sample's .json, table columns)
    embedding: npt.NDArray[np.float32] | None = None  # L2-normalised, when the run asked for embeddings

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        if self.status == "ok":
            out_ok: dict[str, Any] = {
                "input": self.input,
                "status": "ok",
                "predictions": [p.to_dict() for p in self.predictions],
                "sha256": self.sha256,
                "width": self.width,
                "height": self.height,
            }
            if self.warnings:
                out_ok["warnings"] = list(self.warnings)
            if self.meta is not None:
                out_ok["meta"] = self.meta
            if self.embedding is not None:
                out_ok["embedding"] = [round(float(v), 6) for v in self.embedding]
            return out_ok
        out: dict[str, Any] = {"input": self.input, "status": "error"}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        out["error"] = self.error.to_dict() if self.error else {"type": "internal", "message": "unknown"}
        if self.meta is not None:
            out["meta"] = self.meta
        return out

    @classmethod
    def success(
        cls, input: str, top: TopScores, spec: ModelSpec, options: RecordOptions, *,
        sha256: str | None, width: int, height: int, warnings: tuple[str, ...] = (),
    ) -> Record:
        """An ``ok`` record: ``top`` shaped by ``options``, read as ``spec`` says (its labels and English names,
        whether it outputs probabilities, a CLIP model's logit scale); ``warnings``: what the decoder said."""
        predictions = top.predictions(
            spec.labels, options.top_k, options.score, options.threshold,
            probabilities=spec.output == "probabilities", labels_en=spec.labels_en, logit_scale=spec.logit_scale,
        )
        record = cls(input, "ok", predictions, sha256, width, height)
        record.warnings = warnings
        if options.scores:
            record.scores = top.row
        if options.embeddings:
            record.embedding = top.embedding
        return record

    @classmethod
    def failure(cls, input: str, type: ErrorType, message: str, sha256: str | None = None) -> Record:
        return cls(input=input, status="error", sha256=sha256, error=ErrorInfo(type, message))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        if data.get("status") == "ok":
            return cls(
                input=data["input"],
                status="ok",
                predictions=[Prediction(p["index"], p["label"], p["score"], p.get("label_en"))
                             for p in data["predictions"]],
                sha256=data.get("sha256"),
                width=data.get("width"),
                height=data.get("height"),
                warnings=tuple(data.get("warnings") or ()),
                meta=data.get("meta"),
                embedding=np.asarray(data["embedding"], dtype=np.float32) if data.get("embedding") else None,
            )
        err = data.get("error") or {}
        failed = cls.failure(data["input"], err.get("type", "internal"), err.get("message", ""), data.get("sha256"))
        failed.meta = data.get("meta")
        return failed
