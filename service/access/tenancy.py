"""What one partner's key may read of what others sent.

The catalogue (individuals and their gallery photos) is shared: every key identifies against
it. What a partner sends is its own: an integration key reads only the identifications it asked
for and the query photos it sent (an identical photo sent by two partners is stored once, and
each reads it through its own identification). Curators and admins review everything. Jobs
follow the same rule in ``service.jobs.queue.can_see``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, false, or_, true

from service.access.auth import Principal
from service.db.tables import Identification, Image


def sees_everything(viewer: Principal) -> bool:
    return viewer.can("curator")


def own_identifications(viewer: Principal) -> Any:
    """A WHERE clause: the identifications ``viewer`` may read."""
    if sees_everything(viewer):
        return true()
    if viewer.key_id is None:
        return false()
    return Identification.key_id == viewer.key_id


def can_read_identification(viewer: Principal, ident: Identification) -> bool:
    return sees_everything(viewer) or (viewer.key_id is not None and ident.key_id == viewer.key_id)


def readable_images(viewer: Principal) -> Any:
    """A WHERE clause: the images ``viewer`` may read (the catalogue's, and its own queries)."""
    if sees_everything(viewer):
        return true()
    shared = or_(Image.source != "query", Image.individual_id.is_not(None))
    if viewer.key_id is None:
        return shared
    asked = exists().where(
        Identification.query_image_id == Image.id, Identification.key_id == viewer.key_id
    )
    return or_(shared, asked)
