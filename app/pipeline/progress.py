"""A request's progress over several passes (its plans' passes, its images' passes, the
faithfulness pass after them) as one count, for a job's ``progress``."""

from __future__ import annotations

from app.cam import ProgressCallback


class ChainedProgress:
    """The progress of the passes of one request, one after the other, as one count: each
    report adds what the passes before it did (their totals are known once they ran)."""

    def __init__(self, progress: ProgressCallback) -> None:
        self.progress = progress
        self.before = 0
        self.total = 0

    def __call__(self, done: int, total: int) -> None:  # called in the pass thread
        # A pass's total only grows; a stage that knows it before its pass starts (ROAD, before
        # its imputation) says so, and the pass's opening (0, 0) does not take it back.
        self.total = max(self.total, total)
        self.progress(self.before + done, self.before + self.total)

    def next_pass(self) -> None:
        self.before += self.total
        self.total = 0


def chain_progress(progress: ProgressCallback | None) -> ChainedProgress | None:
    """``progress`` chained over passes; None when nobody listens."""
    return None if progress is None else ChainedProgress(progress)
