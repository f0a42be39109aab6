from fastapi import APIRouter
from pydantic import BaseModel, Field

from serving.deps import PoliciesDep
from serving.protocol import ErrorResponse

router = APIRouter(prefix="/v1/admin")


class PolicyState(BaseModel):
    current: str
    candidate: str | None
    versions: list[str]


class ActivatePolicy(BaseModel):
    version: str = Field(pattern=r"^v\d+$", description="The version new requests get from now on, e.g. 'v3'.")


class SetCandidate(BaseModel):
    version: str | None = Field(pattern=r"^v\d+$", description="The A/B challenger, e.g. 'v4'; null: none.")


@router.get("/policy", response_model=PolicyState)
async def get_policy(policies: PoliciesDep) -> PolicyState:
    return PolicyState(current=policies.current.name, candidate=policies.candidate and policies.candidate.name,
                       versions=[p.name for p in policies.versions()])


@router.post("/policy", response_model=PolicyState, responses={404: {"model": ErrorResponse}})
async def activate_policy(body: ActivatePolicy, policies: PoliciesDep) -> PolicyState:
    """Serve `version` from now on: a rollback or a pin. Later announcements still move serving forward."""
    await policies.activate(body.version)
    return await get_policy(policies)


@router.post("/candidate", response_model=PolicyState, responses={404: {"model": ErrorResponse}})
async def set_candidate(body: SetCandidate, policies: PoliciesDep) -> PolicyState:
    """Set the version that A/B requests (`"ab": true`) compare with the current one."""
    await policies.set_candidate(body.version)
    return await get_policy(policies)
