"""Why the legacy and the candidate disagree: captured requests listed, shown, replayed, diagnosed.

Offline tools over a capture folder (`server/capture.py`); none of them runs on the serving path.
"""


class InsightError(Exception):
    """A replay, diagnosis or suggestion cannot run as asked; the message says what to change."""
