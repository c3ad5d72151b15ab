"""``python -m wanwu`` = the ``wanwu`` command."""

from wanwu.cli.main import run

run()
