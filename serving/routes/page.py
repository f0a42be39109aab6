from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter()

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    """The end-user page: chat, thumbs on every answer, and A/B choices. Plain HTML, no build step."""
    return FileResponse(PAGE, media_type="text/html")
