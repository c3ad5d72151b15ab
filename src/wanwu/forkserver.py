"""The forkserver that decode processes are forked from, and starting it early.

Each decode process (:mod:`wanwu.decoders`) is forked from multiprocessing's forkserver, which imports numpy,
Pillow and wanwu's decoder once (about 0.4 s of CPU), so that every process forked from it starts in
milliseconds. A ``wanwu recognize`` over a folder, a glob or a list on stdin will start decode processes, so
the command starts the forkserver (:func:`start_early`) before importing its own modules and loading the model:
the forkserver's imports then run on the other core meanwhile, instead of after them. This module imports
nothing heavy itself.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Sequence
from typing import Any

PRELOAD = ["wanwu._decode_server", "wanwu.imaging", "wanwu.decodeprocess", "wanwu.decoders"]


def context() -> Any:
    """The forkserver context, its preload set (it applies when the server starts)."""
    import multiprocessing  # here: a run that decodes in its own process never needs it

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start() -> None:
    """Start the forkserver now if it is not running; it imports its preloads in its own process."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()


def start_early(args: Sequence[str]) -> bool:
    """Start the forkserver when ``wanwu recognize ARGS`` will surely start decode processes: some argument
    names a folder, a glob or ``-`` (a list on stdin), and nothing asks for threads (``-j 0``) or Ray.
    A run of a few files decodes in its own process and starts none. Returns whether it started one."""
    if not _will_start_decoders(args):
        return False
    try:
        start()
    except (OSError, ValueError) as e:  # the run starts it later, or reports why it cannot
        import logging

        logging.getLogger("wanwu").debug("forkserver not started early: %s", e)
        return False
    return True


def _will_start_decoders(args: Sequence[str]) -> bool:
    if any(a in ("ray", "-j0", "--decoders=0", "--runner=ray") for a in args):
        return False
    if any(a in ("-j", "--decoders") and b == "0" for a, b in itertools.pairwise(args)):
        return False
    return any(a == "-" or (not a.startswith("-") and (glob.has_magic(a) or os.path.isdir(a))) for a in args)
