from datetime import datetime

from fastapi import APIRouter

from serving.deps import PoliciesDep
from serving.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(policies: PoliciesDep) -> ModelList:
    """The served name (always the current version) and every published version, pinnable as name@version."""
    name = policies.served_model_name
    current = policies.current
    cards = [ModelCard(id=name, created=_created(current.manifest), root=f"{name}@{current.name}")]
    for policy in policies.versions():
        cards.append(ModelCard(id=f"{name}@{policy.name}", created=_created(policy.manifest),
                               root=f"{name}@{policy.name}", parent=policy.manifest.get("parent")))
    return ModelList(data=cards)


def _created(manifest: dict) -> int:
    stamp = manifest.get("created_at")
    return int(datetime.fromisoformat(stamp).timestamp()) if stamp else 0
