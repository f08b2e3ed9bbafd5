"""One vocabulary of error codes, and one table from the core's exceptions to statuses."""

from __future__ import annotations

import pytest

import chatstream.errors as errors
from chatstream.errors import ChatstreamError, ErrorCode, Refused
from chatstream.server.errors import STATUS, refusal, status_of


def _subclasses(kind: type[ChatstreamError]) -> list[type[ChatstreamError]]:
    found = []
    for sub in kind.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


@pytest.mark.parametrize("kind", _subclasses(Refused), ids=lambda k: k.__name__)
def test_every_refusal_has_a_client_error_status_of_its_own(kind: type[Refused]) -> None:
    assert kind in STATUS
    assert 400 <= status_of(kind("no")) < 600
    assert isinstance(kind.code, ErrorCode)


def test_the_docstring_names_every_exception_and_every_code() -> None:
    doc = errors.__doc__ or ""
    for kind in [ChatstreamError, *_subclasses(ChatstreamError)]:
        if kind.__module__ == "chatstream.errors":
            assert kind.__name__ in doc
    for code in ErrorCode:
        assert code.value in doc, code


def test_a_refusal_carries_its_code_message_and_wait() -> None:
    response = refusal(errors.RateLimited("slow down", retry_after_s=7))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert bytes(response.body) == b'{"error":{"code":"RATE_LIMITED","message":"slow down"}}'
    busy = refusal(errors.RateLimited("too many", code=ErrorCode.TOO_MANY_STREAMS))
    assert b'"TOO_MANY_STREAMS"' in bytes(busy.body)
    assert refusal(errors.StoreError("down")).headers["retry-after"] == "5"
    assert status_of(errors.ModelTimeout("late")) == 502
    assert "www-authenticate" in refusal(errors.Unauthorized("who?")).headers
