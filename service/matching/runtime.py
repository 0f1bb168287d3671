"""The active model of this process: its ``Identifier``, kept in step with the database on each
request, loaded ahead of an activation (``prepare``) and switched to."""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import IO

from sqlalchemy import literal, select
from sqlalchemy.orm import Session, sessionmaker
from threadpoolctl import threadpool_limits

from service.contract import ModelStatus
from service.db.tables import ApiKey, Model
from service.errors import KeyRevoked, NoActiveModel
from service.gallery.sync import Filters, gallery_version
from service.matching.features import FeatureStore
from service.matching.identify import IdentificationResult, Identifier, ModelInfo
from service.matching.slots import WorkSlots
from service.settings import Settings
from service.store.photos import PhotoStore

log = logging.getLogger(__name__)


class Runtime:
    """The identifier of the active model, kept in step with the database on each request: a
    model activated or a gallery changed by another process is picked up at the next call."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        if settings.blas_threads:  # for the whole process: the pools are the library's
            threadpool_limits(settings.blas_threads, user_api="blas")
        self._identifier: Identifier | None = None
        # A model loaded ahead of its activation (``prepare``), so the switch costs no load.
        self._standby: Identifier | None = None
        self._lock = threading.Lock()
        self.slots = WorkSlots(settings)  # shared by every model this process loads
        self.photos = PhotoStore.open(settings)  # what GET /images/{id}/file reads
        self.features = FeatureStore(settings, factory)  # what GET .../matches reads

    @property
    def loaded(self) -> Identifier | None:
        return self._identifier

    def current(self, confirm_key: int | None = None) -> Identifier:
        """The active model's identifier, loading or syncing it first if the database moved.
        With ``confirm_key``: ``KeyRevoked`` unless that API key is live, read in the same
        statement."""
        live_key = (
            select(ApiKey.id)
            .where(ApiKey.id == confirm_key, ApiKey.revoked_at.is_(None))
            .scalar_subquery()
            if confirm_key is not None
            else literal(None)
        )
        with self.factory() as session:  # one statement: the model and its gallery's version
            found = session.execute(
                select(Model, gallery_version(Model.id), live_key).where(
                    Model.status == ModelStatus.ACTIVE
                )
            ).first()
            if found is None:
                raise NoActiveModel()
            if confirm_key is not None and found[2] is None:
                raise KeyRevoked()
            info, version = ModelInfo.of(found[0]), int(found[1])
        identifier = self._identifier
        if identifier is None or identifier.model.id != info.id:
            with self._lock:
                identifier = self._switch()
        else:
            if identifier.model != info:  # its head, verification or calibration was changed
                identifier.model = info
            if identifier.gallery.version != version:
                self.sync(identifier)
        return identifier

    def identify(
        self,
        data: bytes | IO[bytes],
        *,
        filters: Filters,
        bbox: tuple[int, int, int, int] | None = None,
        original_name: str | None = None,
        key_id: int | None = None,
        confirm_key: int | None = None,
    ) -> IdentificationResult:
        """Identify one photo with the active model (``Identifier.identify``), recorded. Once a
        model is loaded, the check that it is still the active one, with its gallery up to date
        (``current``), runs beside the photo's decoding rather than before it; with
        ``confirm_key``, it also confirms that key is not revoked (``KeyRevoked``)."""
        loaded = self._identifier
        if loaded is None:
            return self.current(confirm_key).identify(
                data, filters=filters, bbox=bbox, original_name=original_name, key_id=key_id
            )
        return loaded.identify(
            data,
            filters=filters,
            bbox=bbox,
            original_name=original_name,
            key_id=key_id,
            check=partial(self.current, confirm_key),
        )

    def _switch(self) -> Identifier:
        """Under the lock: the active model's identifier, loaded unless it is already. The active
        id is read again here: a request that read it before a switch must not load the old
        model back."""
        with self.factory() as session:
            model = session.scalar(select(Model).where(Model.status == ModelStatus.ACTIVE))
        if model is None:
            raise NoActiveModel()
        identifier = self._identifier
        if identifier is not None and identifier.model.id == model.id:
            return identifier
        standby, self._standby = self._standby, None
        if standby is not None and standby.model.id == model.id:
            log.info(
                "switching to prepared model %s %s (id %s)", model.name, model.version, model.id
            )
            standby.model = ModelInfo.of(model)
            standby.sync(self.factory)
            self._identifier = standby
            return standby
        log.info("loading model %s %s (id %s)", model.name, model.version, model.id)
        identifier = self._identifier = Identifier.load(
            self.settings, self.factory, model, self.slots
        )
        return identifier

    def prepare(self, model_id: int) -> None:
        """Load a model that is about to be activated, so that the switch itself loads nothing.
        Its head (k, cutoff, ranking) is read again if the activation changes it."""
        with self.factory() as session:
            model = session.get_one(Model, model_id)
        identifier = Identifier.load(self.settings, self.factory, model, self.slots)
        with self._lock:
            self._standby = identifier

    def drop_prepared(self) -> None:
        with self._lock:
            self._standby = None

    def sync(self, identifier: Identifier | None = None) -> None:
        """Bring the loaded gallery up to the database's change log, now."""
        identifier = identifier or self._identifier
        if identifier is not None:
            with self._lock:
                identifier.sync(self.factory)
