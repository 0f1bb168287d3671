"""The errors every layer raises for a request it cannot carry out; the message says why and
what to do. The API answers them 404, 409 and 422, the command line with exit status 2."""

from __future__ import annotations


class DomainError(Exception):
    """A request that cannot be carried out; the message says why and what to do."""


class NotFound(DomainError):
    """What the request names does not exist (or is not the caller's to see)."""


class Conflict(DomainError):
    """The request clashes with the current state (a decided identification, an active model)."""


class Invalid(DomainError):
    """The request itself is wrong (a bad value, a photo that is not one)."""
