"""Exceptions of the data layer, so callers can tell a bad manifest from a bad image or a bad download."""

from __future__ import annotations

from fedmq.shared.errors import FedmqError


class DataError(FedmqError):
    """Base class for everything the data layer refuses."""


class ManifestError(DataError):
    """The manifest CSV cannot be used; the message names the line."""

    def __init__(self, manifest: str, line: int | None, message: str) -> None:
        self.manifest = manifest
        self.line = line
        where = f"{manifest}:{line}" if line is not None else manifest
        super().__init__(f"{where}: {message}")


class ImageReadError(DataError):
    """One image cannot be turned into a tensor; ``reason`` is meant for the operator's log."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnsupportedTransferSyntax(ImageReadError):
    """A DICOM file is compressed with a codec for which no decoder is installed."""


class UnsupportedImage(ImageReadError):
    """The file was read but holds something we deliberately do not accept (multi-frame, colour palette...)."""


class DatasetDownloadError(DataError):
    """The dataset could not be located or fetched."""


class ChecksumMismatch(DatasetDownloadError):
    """A file's MD5 differs from the expected one; it must not be used."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"{path}: MD5 {actual} does not match the expected {expected}")
