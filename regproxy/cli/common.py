"""What every command shares: the event loop (uvloop when importable) and the command type."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias, TypeVar

from regproxy.config import Config
from regproxy.schema import IndexMissing

#: ``run(config, args) -> exit code``, set on each subparser with ``set_defaults(run=...)``
Command: TypeAlias = Callable[[Config, argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when importable (it is a dependency), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


def positive_int(text: str) -> int:
    """An argparse ``type``: a count of 1 or more (argparse turns the error into its usage line,
    exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return n


def no_store_yet(config: Config, command: str) -> bool:
    """Whether ``storage.root`` holds no store yet (no ``index.db``: a wrong root?), for a
    command that fills one from the upstreams (export, pin, unpin, prefetch). Without sync it
    has nothing to pull from: refused as the commands that only read refuse
    (:class:`IndexMissing`: one line, exit 2), before anything is made."""
    index = config.storage.root / "index.db"
    if index.exists():
        return False
    if not config.sync_enable:
        raise IndexMissing(
            index, f"{command} without sync has no store to use and nothing to pull from"
        )
    return True


def say_store_made(config: Config, command: str) -> None:
    """A writer made a new store to pull into (:func:`no_store_yet`): said on stderr, so that a
    wrong ``storage.root`` does not pass unseen."""
    print(
        f"regproxy {command}: made a new store at {config.storage.root} to pull the images "
        "through into (there was none: check storage.root)",
        file=sys.stderr,
    )
