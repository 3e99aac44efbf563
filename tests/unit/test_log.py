"""Log lines: JSON lines carry the event and each ``key=value`` as JSON keys; text is unchanged."""

from __future__ import annotations

import io
import json
import logging

import pytest

from regproxy.log import _JSONFormatter, _TextFormatter, structured_fields


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("regproxy.fetch", logging.INFO, __file__, 1, msg, args, exc_info)


def test_json_line_has_the_event_and_fields_as_keys() -> None:
    line = _JSONFormatter().format(
        _record(
            "fetch.committed digest=%s repo=%s bytes=%d seconds=%.1f source=%s",
            "sha256:" + "a" * 64,
            "spectro-images/docker.io/library/nginx",
            1234,
            0.25,
            "https://registry-1.docker.io",
        )
    )
    out = json.loads(line)
    assert out["event"] == "fetch.committed"
    assert out["digest"] == "sha256:" + "a" * 64
    assert out["repo"] == "spectro-images/docker.io/library/nginx"
    assert out["bytes"] == 1234  # a number stays a number
    assert out["seconds"] == "0.2"  # what the format asked for
    assert out["source"] == "https://registry-1.docker.io"
    assert out["level"] == "info" and out["logger"] == "regproxy.fetch"
    assert out["msg"].startswith("fetch.committed digest=sha256:")


def test_values_with_spaces_and_several_placeholders() -> None:
    event, fields = structured_fields(
        _record(
            "listening address=%s:%d tls=%s error=%s",
            "127.0.0.1",
            30003,
            False,
            "connection refused by peer",
        )
    )
    assert event == "listening"
    assert fields == {
        "address": "127.0.0.1:30003",
        "tls": False,
        "error": "connection refused by peer",
    }


def test_credentials_are_masked_in_fields_and_msg() -> None:
    out = json.loads(
        _JSONFormatter().format(_record("upstream.failed url=%s", "https://u:secret@host/v2/"))
    )
    assert out["url"] == "https://***:***@host/v2/"
    assert "secret" not in json.dumps(out)


def test_free_text_and_reserved_keys() -> None:
    event, fields = structured_fields(_record("Something happened: level=%s msg=%s", "x", "y"))
    assert event is None  # "Something" is no event name
    assert fields == {"level_": "x", "msg_": "y"}
    event, fields = structured_fields(_record("housekeeping.failed"))
    assert (event, fields) == ("housekeeping.failed", {})
    event, fields = structured_fields(_record("already formatted n=5 what=100%"))
    assert fields == {"n": "5", "what": "100%"}


def test_exception_goes_in_exc() -> None:
    out = json.loads(_JSONFormatter().format(_record("request.crashed path=%s", "/v2/", exc=True)))
    assert out["path"] == "/v2/" and "ValueError: boom" in out["exc"]


@pytest.mark.parametrize(
    ("args", "expected"), [(("one",), {"a": "one"}), ((), {"a": "%s", "b": "%s"})]
)
def test_too_few_arguments_is_no_crash(args: tuple[object, ...], expected: dict[str, str]) -> None:
    assert structured_fields(_record("x.y a=%s b=%s", *args)) == ("x.y", expected)


def test_text_format_is_unchanged() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_TextFormatter("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("regproxy.test_log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("fetch.failed digest=%s url=%s", "sha256:ab", "https://a:b@h/x")
    finally:
        logger.removeHandler(handler)
    assert (
        stream.getvalue()
        == "WARNING regproxy.test_log fetch.failed digest=sha256:ab url=https://***:***@h/x\n"
    )


def test_a_value_cannot_start_a_line_of_its_own() -> None:
    """A client's path (``%0A`` decoded), a user name or an upstream's header may hold a newline:
    it is escaped, so nobody can forge a log line; a traceback keeps its lines."""
    formatter = _TextFormatter("%(levelname)s %(name)s %(message)s")
    forged = "/v2/a\n2026-01-01 INFO regproxy.access FORGED\r\x1b[2J/manifests/x"
    line = formatter.format(_record("request method=%s path=%s", "GET", forged))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith(r"path=/v2/a\n2026-01-01 INFO regproxy.access FORGED\r\x1b[2J/manifests/x")
    with_traceback = formatter.format(_record("fetch.crashed path=%s", forged, exc=True))
    first, *rest = with_traceback.splitlines()
    assert first.startswith("INFO regproxy.fetch fetch.crashed path=/v2/a\\n2026")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"
