"""Errors raised while reading datasets: each names the file (and sample) that is wrong.

They subclass ``ValueError`` so the CLI prints their message as one line without a traceback.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A whole input (annotations file, folder) is unusable; no sample can be read from it."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SampleError(ValueError):
    """One sample is bad (image does not decode, annotation does not fit the image, ...).

    Message format (the CLI prints it after ``cf: error:``): ``<path> (sample <key>): <reason>``.
    """

    def __init__(self, path: object, key: str, reason: str) -> None:
        self.path = str(path)
        self.key = key
        self.reason = reason
        super().__init__(f"{self.path} (sample {key}): {reason}")

    def as_dict(self) -> dict[str, str]:
        """The JSON line written to ``skipped.jsonl``."""
        return {"key": self.key, "path": self.path, "reason": self.reason}


class ImageDecodeError(ValueError):
    """Image bytes that Pillow cannot decode (truncated, not an image, unsupported mode)."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")
