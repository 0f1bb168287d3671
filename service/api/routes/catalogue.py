"""Read access to the catalogue: individuals and their photos."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse

from service.api.deps import Integration, RuntimeDep, SessionDep
from service.api.params import ImageId, IndividualId, Limit, Offset, SpeciesFilter
from service.api.schemas import (
    INVALID,
    ImageOut,
    IndividualDetail,
    IndividualOut,
    IndividualPage,
    Problem,
)
from service.catalogue.curation import resolve
from service.catalogue.reads import (
    individual_by_catalogue_id,
    individuals_page,
    photos_of,
    readable_image,
)
from service.errors import NotFound
from service.store.objects import MissingObject

router = APIRouter(tags=["catalogue"], responses=INVALID)


@router.get("/individuals", response_model=IndividualPage)
def list_individuals(
    session: SessionDep,
    caller: Integration,
    species: SpeciesFilter = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> IndividualPage:
    """Individuals of the catalogue, ordered by catalogue id, optionally of one species."""
    total, rows = individuals_page(session, species, offset, limit)
    items = [
        IndividualOut(
            individual_id=ind.catalogue_id,
            species=ind.species,
            display_name=ind.display_name,
            image_count=n,
        )
        for ind, n in rows
    ]
    return IndividualPage(items=items, total=total, offset=offset, limit=limit)


@router.get(
    "/individuals/{individual_id}",
    response_model=IndividualDetail,
    responses={404: {"model": Problem}, 308: {"description": "Merged: see the target."}},
)
def get_individual(
    individual_id: IndividualId, session: SessionDep, caller: Integration
) -> IndividualDetail | RedirectResponse:
    """One individual by its catalogue id, with its photos (a merged one redirects)."""
    ind = individual_by_catalogue_id(session, individual_id)
    if ind is None:
        raise NotFound(f"individual {individual_id!r} is not in the catalogue")
    if ind.merged_into_id is not None:
        # A merged individual redirects to the one it was merged into.
        target = resolve(session, ind.catalogue_id).catalogue_id
        return RedirectResponse(f"/individuals/{quote(target, safe='')}", status_code=308)
    images = photos_of(session, ind.id)
    return IndividualDetail(
        individual_id=ind.catalogue_id,
        species=ind.species,
        display_name=ind.display_name,
        image_count=len(images),
        images=[ImageOut.model_validate(i) for i in images],
    )


@router.get(
    "/images/{image_id}/file",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, 404: {"model": Problem}},
)
def get_image_file(
    image_id: ImageId, session: SessionDep, runtime: RuntimeDep, caller: Integration
) -> Response:
    """The stored photo file (for a query photo: what identification needs of it). A catalogue
    photo is everyone's; a query photo is readable by the keys that sent it, and curators."""
    image = readable_image(session, caller, image_id)
    if image is None:  # another partner's query photo answers as one that does not exist
        raise NotFound(f"image {image_id} does not exist")
    if image.pruned_at is not None:
        raise NotFound(
            f"the file of image {image_id} was pruned on {image.pruned_at:%Y-%m-%d}: it was a "
            "query photo never confirmed within the retention period",
        )
    try:
        data = runtime.photos.read(image.file_path)
    except MissingObject as e:
        raise NotFound(f"the file of image {image_id} is missing from the photo store") from e
    return Response(data, media_type=image.media_type)
