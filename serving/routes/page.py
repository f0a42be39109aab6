from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from serving.errors import not_found

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


async def _enabled(request: Request) -> None:
    if not request.app.state.settings.page:
        raise not_found("this server has no end-user page (SERVING_PAGE=false)")


router = APIRouter(dependencies=[Depends(_enabled)])


class PageSession(BaseModel):
    token: str
    expires_in: float  # seconds


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    """The end-user page: chat, thumbs on every answer, and A/B choices. Plain HTML, no build step."""
    return FileResponse(PAGE, media_type="text/html")


@router.post("/page/session", include_in_schema=False)
async def page_session(request: Request) -> PageSession:
    """A short-lived token the page sends as its bearer key (serving/page_sessions.py): the app routes take
    it, the admin routes never do."""
    sessions = request.app.state.page_sessions
    return PageSession(token=sessions.issue(), expires_in=sessions.ttl_s)
