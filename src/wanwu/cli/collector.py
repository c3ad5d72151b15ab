"""How long-running commands (``recognize``, ``serve``, ``worker``) set Python's cyclic garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_COLLECTION = 50_000  # allocations between two collections of the youngest generation (Python's: 700)


@contextmanager
def collecting_less() -> Iterator[None]:
    """Python's cyclic garbage collector, tuned for a long run, and put back as it was after it.

    A run allocates a few dozen objects per record (a server, per request), and almost all of them are freed by
    their reference count as soon as the record is written. With Python's defaults, the collector still scans
    the young objects every 700 allocations and, now and then, every object of the process (numpy's,
    onnxruntime's, the labels', a server's web framework): 0.6-0.8 s of a 100,000-file rerun answered from the
    cache, and 2-4% of a loaded server's images per second. Here what is loaded before the run is frozen (never
    scanned again), and the youngest generation is collected every :data:`YOUNG_COLLECTION` allocations. A
    caller that froze objects itself keeps its own freezing."""
    threshold = gc.get_threshold()
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    gc.set_threshold(max(threshold[0], YOUNG_COLLECTION), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if freeze:
            gc.unfreeze()
