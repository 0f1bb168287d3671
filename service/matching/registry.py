"""The registry of model kinds and verification modes, found by name (after timm's model
registry: a name maps to how the thing is made; whaleid's own code).

A model row says its ``kind`` and its ``verification``; together they name the matchers that
answer for it (``fusion_for``): the kind's own matchers, then the mode's. Built in:

- kinds: ``onnx`` (an embedding model: the kNN head) and ``local-features`` (no trained
  model: the local-features matcher alone, which always verifies);
- verification modes: ``none`` (the kind's matchers as they are) and ``rerank`` (local features
  added: ``matching.local.LocalFeatures``).

Adding one is one line here (or in its own module, for a mode defined elsewhere, as the toy
matcher of ``tests/service/matching/toy_matcher.py`` is)::

    register_verification("toy", ToyMatcher)

Everything that offers the choice reads it from here: the command line's ``--mode`` and
``--verification``, the API's ``verification`` field, ``models verify``'s check. A matcher is
given as its class, or as ``"module:Class"``, imported when first used (so the command line
starts without loading OpenCV).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic_core import core_schema

from service.contract import ModelKind, Verification
from service.errors import Invalid

if TYPE_CHECKING:
    from service.matching.fusion import Fusion
    from service.matching.matcher import Matcher


@dataclass(frozen=True)
class Kind:
    """A kind of model: its own matchers, the verification modes it may answer with (None:
    every one) and why others are refused, ``at_least`` (``fusion.Fusion``), and ``grid``:
    whether its embedding answers (the shadow evaluation scores it on the head grid)."""

    name: str
    matchers: tuple[type[Matcher] | str, ...]
    verifications: frozenset[str] | None = None
    refusal: str = ""
    at_least: int = 0
    grid: bool = True


@dataclass(frozen=True)
class Mode:
    """A verification mode: the matchers it adds to the kind's."""

    name: str
    matchers: tuple[type[Matcher] | str, ...]


_KINDS: dict[str, Kind] = {}
_MODES: dict[str, Mode] = {}
_FUSIONS: dict[tuple[str, str], Fusion] = {}
_LOCK = threading.Lock()


def register_kind(kind: Kind) -> Kind:
    with _LOCK:
        if kind.name in _KINDS:
            raise ValueError(f"model kind {kind.name!r} is registered already")
        _KINDS[kind.name] = kind
    return kind


def register_verification(name: str, *matchers: type[Matcher] | str) -> Mode:
    """Register a verification mode: ``name`` adds ``matchers`` to a model's own."""
    with _LOCK:
        if name in _MODES:
            raise ValueError(f"verification {name!r} is registered already")
        _MODES[name] = mode = Mode(name, matchers)
    return mode


# Live views of the names (what the command line's choices read).
KIND_NAMES = _KINDS.keys()
VERIFICATION_NAMES = _MODES.keys()


def kinds() -> tuple[str, ...]:
    """The model kinds, in the order they were registered."""
    return tuple(_KINDS)


def verifications() -> tuple[str, ...]:
    """The verification modes, in the order they were registered."""
    return tuple(_MODES)


def kind_of(name: str | None) -> Kind:
    found = _KINDS.get(name or ModelKind.ONNX)
    if found is None:
        raise Invalid(f"model kind {name!r}: the kinds are {', '.join(kinds())}")
    return found


def check_verification(kind: str | None, mode: str) -> str:
    """``mode`` if a model of ``kind`` may answer with it; else ``Invalid``, saying what to use."""
    if mode not in _MODES:
        raise Invalid(f"verification {mode!r}: use {' or '.join(verifications())}")
    found = kind_of(kind)
    if found.verifications is not None and mode not in found.verifications:
        raise Invalid(
            found.refusal
            or f"a {found.name} model answers with verification "
            f"{' or '.join(sorted(found.verifications))}"
        )
    return mode


def _made(ref: type[Matcher] | str) -> Matcher:
    if isinstance(ref, str):
        module, _, name = ref.partition(":")
        made: Matcher = getattr(importlib.import_module(module), name)()
        return made
    return ref()


def fusion_for(kind: str | None, verification: str | None) -> Fusion:
    """The matchers that answer for a model of ``kind`` with ``verification``, made once."""
    key = (kind or ModelKind.ONNX, verification or Verification.NONE)
    found = _FUSIONS.get(key)
    if found is not None:
        return found
    from service.matching.fusion import Fusion

    check_verification(*key)
    spec, mode = kind_of(key[0]), _MODES[key[1]]
    fusion = Fusion(tuple(_made(m) for m in (*spec.matchers, *mode.matchers)), spec.at_least)
    with _LOCK:
        return _FUSIONS.setdefault(key, fusion)


class HasMatchers(Protocol):
    """Anything naming its kind and verification: a model row, a ``ModelInfo``."""

    kind: Any
    verification: Any


def uses_features(model: HasMatchers) -> bool:
    """Whether a model's answers need local features (one of its matchers does)."""
    from service.matching.matcher import Need

    return Need.LOCAL_FEATURES in fusion_for(model.kind, model.verification).needs


def verifies(model: HasMatchers) -> bool:
    """Whether a model's answer is a calibrated fusion (not the kNN head alone)."""
    return fusion_for(model.kind, model.verification).calibrated


class RegisteredName:
    """A name of one of the registry's lists, as a pydantic type's annotation
    (``Annotated[str, RegisteredName("verification", verifications)]``): checked when a value
    is read, and offered as the JSON schema's enum when the schema is made (so a mode
    registered at start-up is accepted and offered)."""

    def __init__(self, what: str, names: Callable[[], Sequence[str]]) -> None:
        self.what, self.names = what, names

    def _check(self, value: str) -> str:
        if value not in self.names():
            raise ValueError(f"{self.what} {value!r}: use {' or '.join(self.names())}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        found: dict[str, Any] = handler(schema)
        return {**found, "enum": list(self.names())}


# The built-ins: one line each.
register_kind(Kind(ModelKind.ONNX, ("service.matching.head:KnnHead",)))
register_kind(
    Kind(
        ModelKind.LOCAL_FEATURES,
        (),
        verifications=frozenset({Verification.RERANK}),
        refusal="the local-features matcher always verifies: it has no embedding",
        at_least=4,
        grid=False,
    )
)
register_verification(Verification.NONE)
register_verification(Verification.RERANK, "service.matching.local:LocalFeatures")
