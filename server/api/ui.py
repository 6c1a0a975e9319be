"""The page at GET / (DESIGN.md "Clients"): static files shipped inside the package
(server/api/static/), served as they are. The page is a client of the public API like any
other; nothing here reaches the engine, and no file is built or fetched at run time."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Response

# URL path -> (file in static/, content type). The page loads only these, all from this server.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/ui/page.css": ("page.css", "text/css; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),
}

# The page has no inline script or style, so the policy can allow only this origin's files and
# API: an injected <script> or a token text rendered as markup would not run, and the page
# cannot send a prompt or a key anywhere but here.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: always revalidate, so an upgraded server never runs an old page.
    "Cache-Control": "no-cache",
}


def page_router() -> APIRouter:
    """GET routes for PAGE_FILES, each file read once here."""
    router = APIRouter(include_in_schema=False)
    static = files(__package__) / "static"
    for path, (name, media_type) in PAGE_FILES.items():
        router.add_api_route(path, _serve((static / name).read_bytes(), media_type), methods=["GET"])
    return router


def _serve(body: bytes, media_type: str):
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return serve
