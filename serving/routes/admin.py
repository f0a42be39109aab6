from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from serving.canary import Verdict
from serving.deps import PoliciesDep
from serving.errors import APIError
from serving.protocol import ErrorResponse

router = APIRouter(prefix="/v1/admin")


class CanaryState(BaseModel):
    version: str
    baseline: str
    figures: dict[str, float] = Field(description="Requests, failures, ratings and approvals of each arm, "
                                      "the canary's share of the traffic, and its age in seconds.")


class PolicyState(BaseModel):
    current: str
    candidate: str | None
    canary: CanaryState | None
    versions: list[str]
    rolled_back: list[str]
    gates: dict[str, list[str]] = Field(
        description="Each version's evaluation-gate reasons, from its manifest: one line per check "
        "('pass ...', 'fail ...', 'info ...') with its figures. Versions published without the gate are "
        "left out."
    )


class ActivatePolicy(BaseModel):
    version: str = Field(pattern=r"^v\d+$", description="The version new requests get from now on, e.g. 'v3'.")


class SetCandidate(BaseModel):
    version: str | None = Field(pattern=r"^v\d+$", description="The A/B challenger, e.g. 'v4'; null: none.")


class ConcludeCanary(BaseModel):
    verdict: Literal["promoted", "rolled_back"] = Field(description="End the canary now, as the evidence would.")
    reason: str = Field("by an operator", max_length=1000)


@router.get("/policy", response_model=PolicyState)
async def get_policy(policies: PoliciesDep) -> PolicyState:
    trial = policies.trial
    versions = policies.versions()
    return PolicyState(
        current=policies.current.name,
        candidate=policies.candidate and policies.candidate.name,
        canary=trial and CanaryState(version=trial.canary.name, baseline=trial.baseline.name,
                                     figures=trial.figures()),
        versions=[p.name for p in versions],
        rolled_back=[p.name for p in versions if p.rolled_back],
        gates={p.name: p.manifest["gate"] for p in versions if p.manifest.get("gate")},
    )


@router.post("/policy", response_model=PolicyState, responses={404: {"model": ErrorResponse}})
async def activate_policy(body: ActivatePolicy, policies: PoliciesDep) -> PolicyState:
    """Serve `version` from now on: a rollback or a pin. It ends a running canary without a verdict; later
    announcements still move serving forward."""
    await policies.activate(body.version)
    return await get_policy(policies)


@router.post("/canary", response_model=PolicyState, responses={409: {"model": ErrorResponse}})
async def conclude_canary(body: ConcludeCanary, policies: PoliciesDep) -> PolicyState:
    """Promote or roll back the version in canary now, recorded and announced as an automatic verdict is."""
    if policies.trial is None:
        raise APIError(409, "no version is in canary", type="conflict_error")
    await policies.conclude(Verdict(body.verdict, body.reason))
    return await get_policy(policies)


@router.post("/candidate", response_model=PolicyState, responses={404: {"model": ErrorResponse}})
async def set_candidate(body: SetCandidate, policies: PoliciesDep) -> PolicyState:
    """Set the version that A/B requests (`"ab": true`) compare with the current one."""
    await policies.set_candidate(body.version)
    return await get_policy(policies)
