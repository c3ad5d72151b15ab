"""Imported once, by the forkserver that decode workers are forked from (never by anything else).

multiprocessing prepares each forked worker by importing the parent's ``__main__`` module again (as
``__mp_main__``), so that functions defined there can be unpickled. wanwu's workers run only wanwu's own
functions, and re-running the caller's script would run its top level again in every worker: a library user's
plain script without an ``if __name__ == "__main__":`` guard would recognize its inputs once per worker and
crash the pool while bootstrapping. So in this server, and in every worker forked from it, preparing skips the
main module.

It is also the first module the server imports, before numpy: a decode process does no linear algebra, and
OpenBLAS, left to itself, starts a thread per core in every process that imports numpy, whose start-up spin
costs about 0.05 s of CPU each (measured: 0.09 against 0.14 CPU seconds to import numpy on 2 cores).
"""

from __future__ import annotations

import os
from multiprocessing import spawn

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy is imported: see above


def _skip(*_: object) -> None:
    return None


spawn._fixup_main_from_path = _skip  # type: ignore[attr-defined]
spawn._fixup_main_from_name = _skip  # type: ignore[attr-defined]
