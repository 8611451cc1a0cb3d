"""Job records: the ids handed to clients."""

from __future__ import annotations

import pytest

from app.pipeline.jobs import record


def test_a_job_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # An id such as "-Tx..." would read as an option to `camserve jobs watch` and to curl.
    draws = iter(["-Tdash", "-another", "Ok-id_42"])
    monkeypatch.setattr(record.secrets, "token_urlsafe", lambda n: next(draws))
    assert record.new_job_id() == "Ok-id_42"


def test_job_ids_are_24_url_safe_characters_and_differ() -> None:
    ids = {record.new_job_id() for _ in range(2000)}
    assert len(ids) == 2000
    for job_id in ids:
        assert len(job_id) == 24
        assert not job_id.startswith("-")
        assert all(c.isalnum() or c in "-_" for c in job_id)
