"""Every error a request or a command can meet: the one place to add one. Each is a
``DomainError``, and its message says why and what to do next. The API answers each with the
status in ``service/api/errors.py``'s ``PROBLEMS`` table; the command line logs the message and
exits with ``exit_status`` (2 unless the error says otherwise), in ``service/cli/__init__.py``'s
``main()``.

An error that also has a built-in base (``ValueError``, ``RuntimeError``) keeps it, so code that
catches the built-in one (a photo's decode inside a batch, say) still does.

Kept where they are raised, because no request or command meets them: ``jobs.queue.LeaseLost``
(a worker lost its chunk's lease and stops it; another worker finishes it),
``models.switch._TooManyLate`` (ends a shadow evaluation early inside the switch),
``gallery.index.GalleryFileError`` (a damaged index file, rebuilt from the database),
``store.objects.MissingObject`` (a ``FileNotFoundError`` that callers translate),
``outbound.callbacks.BadSignature`` (raised in a partner's receiver by ``verify``, not by the
service), and ``client.WhaleidError`` / ``client.JobTimeout`` (the Python client's own, in the
partner's process)."""

from __future__ import annotations

import math
from typing import Any


class DomainError(Exception):
    """A request that cannot be carried out; the message says why and what to do."""

    exit_status = 2  # the command line's, when a command meets it

    @property
    def report(self) -> dict[str, Any] | None:
        """Figures the command line prints on standard output with the message (none here)."""
        return None


class NotFound(DomainError):
    """What the request names does not exist (or is not the caller's to see)."""


class Conflict(DomainError):
    """The request clashes with the current state (a decided identification, an active model)."""


class Invalid(DomainError):
    """The request itself is wrong (a bad value, a photo that is not one)."""


class TooLarge(Invalid):
    """A body or file over its limit; the message names the limit and how to stay within it."""


# Photos.


class PhotoError(Invalid, ValueError):
    """A photo that cannot be used; the message says what is wrong and what to do."""


class UnsupportedPhoto(PhotoError):
    """Not an image, or a format we do not decode."""


class UnreadablePhoto(PhotoError):
    """Empty, truncated or corrupt."""


class PhotoTooLarge(PhotoError, TooLarge):
    """Over the byte or pixel limit (decompression bombs included)."""


class BadBoundingBox(PhotoError):
    """A crop box that is malformed or falls outside the photo."""


# Text, files and URLs a caller sends.


class BadText(Invalid, ValueError):
    """Text the database would refuse or keep wrongly; the message names the field and limit."""


class CatalogueError(Invalid, ValueError):
    """The catalogue file as a whole cannot be read."""


class ModelContractError(Invalid, ValueError):
    """An ONNX file that does not follow the model contract; the message says what to fix."""


class FetchRefused(Invalid, ValueError):
    """The URL is not allowed (host, scheme or address), or the answer broke a limit. Its
    message shows the URL without its query, fragment and credentials: it reaches partners, and
    a pattern cannot tell where a quoted URL's query ends."""


class TooFewPairs(Invalid, ValueError):
    """Not enough labelled evidence to fit a calibration."""


class TooFewAnimals(Invalid, ValueError):
    """Too few known or unseen animals to choose where ``new_individual`` goes."""


# Keys and sign-in.


class NotAuthenticated(DomainError):
    """No key, or one that is unknown or revoked, or a review session that has ended."""


class Forbidden(DomainError):
    """The caller's key has a role below the one the request needs."""


class KeyRevoked(NotAuthenticated):
    """A key admitted from ``KeyCache`` turned out revoked when the request checked it."""

    def __init__(self) -> None:
        super().__init__(
            "the API key is unknown or revoked: send Authorization: Bearer <key>; an admin "
            "creates keys with `whaleid keys create --role ROLE --name NAME`"
        )


class SignInRefused(DomainError):
    """A key that may not open a review session: ``UnknownKey`` or ``RoleTooLow``."""


class UnknownKey(SignInRefused, NotAuthenticated):
    """No such key, or it is revoked."""


class RoleTooLow(SignInRefused, Forbidden):
    """The key's role is below the one the review page needs."""


class LastAdminKey(Conflict):
    """Revoking this key would leave no admin key, and so no way to manage keys over the API."""


class OverQuota(DomainError):
    """The key already holds as many jobs, waiting photos or stored bytes as it may."""


class OverRate(OverQuota):
    """A job's photos would take the key past its rate; ``retry_after`` (seconds) when waiting
    would help."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# The service's state.


class NoActiveModel(DomainError, RuntimeError):
    """No model is active yet."""

    def __init__(self) -> None:
        super().__init__(
            "no active model: register one with `whaleid models add MODEL.onnx --activate`"
        )


class Busy(DomainError, RuntimeError):
    """No slot came free in time; ``retry_after`` is a hint in whole seconds."""

    def __init__(self, step: str, waited: float) -> None:
        super().__init__(
            f"the service is busy: every {step} slot stayed taken for {waited:g} s; "
            "retry after the time in Retry-After"
        )
        self.retry_after = max(1, math.ceil(waited))


class ActivationRefused(Conflict):
    """The shadow evaluation says no (or cannot say): ``report`` holds the figures."""

    exit_status = 3

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self._report = report

    @property
    def report(self) -> dict[str, Any]:
        return self._report


class ModelFileCorrupt(DomainError, RuntimeError):
    """A fetched model file does not have the sha256 it was registered with."""


class SchemaNotCurrent(DomainError, RuntimeError):
    """The database schema is older than this version of the service."""
