"""The kernel's names of the daemon's threads (regproxy.thread_names)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from regproxy.thread_names import kernel_name, short


def _comm() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


def test_short_names() -> None:
    assert short("regproxy-index-read_0") == b"index-read_0"
    assert short("regproxy-a-name-longer-than-fifteen") == b"a-name-longer-t"
    assert short("plain") == b"plain"


def test_a_pool_thread_takes_its_python_name() -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="regproxy-probe", initializer=kernel_name) as p:
        assert p.submit(_comm).result() == "probe_0"
    # a thread not given one keeps the process's name
    with ThreadPoolExecutor(1, thread_name_prefix="regproxy-other") as p:
        assert p.submit(_comm).result() != "other_0"
