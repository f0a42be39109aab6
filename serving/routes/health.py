from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.deps import EngineDep, PoliciesDep
from serving.errors import APIError

router = APIRouter()


@router.get("/healthz")
async def health(engine: EngineDep, policies: PoliciesDep) -> dict:
    try:
        await engine.check_health()
    except Exception as exc:
        raise APIError(503, f"engine unhealthy: {exc}", type="service_unavailable") from None
    return {"status": "ok", "policy_version": policies.current.name}


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
