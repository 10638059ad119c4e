"""The one error every problem with an HF checkpoint raises, so callers catch one type and print one line."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the config (or cannot be read); the one-line message names tensor and file."""
