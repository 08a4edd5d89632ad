"""Who may see the console's pages: with PEER_REQUIRE_KEY_FOR=all, the holder of a key with the ``read`` scope.

The pages are rendered on the server from the database, so they show what GET /v1/... shows; where reading
needs a key, so do they. A browser cannot send a bearer header when it follows a link, so the console signs
in once: /ui/login takes the key and keeps it in a cookie that scripts cannot read (HttpOnly), that no other
site's request carries (SameSite=Strict) and that only /ui is sent (Path); every page checks it, as a bearer
header would be (a proxy or curl may send ``Authorization: Bearer`` instead). The console's own script sends
the key typed in the page header to the JSON API, as before (the login page puts it there too).

With PEER_REQUIRE_KEY_FOR=write (the default) reading is open and so are the pages.
"""
from __future__ import annotations

from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse

from ..api.security import checked_key, key_required
from .rendering import templates

COOKIE = "peer_console_key"
LOGIN = "/ui/login"
MAX_FORM_BYTES = 4096

router = APIRouter(prefix="/ui", include_in_schema=False)


def console_reader(request: Request) -> None:
    """The dependency of every console page: a 303 to the login page unless the caller may read."""
    settings = request.app.state.ctx.settings
    if not key_required(settings, "read"):
        return
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    token = bearer if scheme.lower() == "bearer" else request.cookies.get(COOKIE, "")
    key = checked_key(request, settings, token) if token else None  # a wrong key is a guess: charged
    if key is None or "read" not in key.scopes:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "sign in with an API key that has the 'read' scope",
                            headers={"Location": f"{LOGIN}?next={quote(target, safe='')}"})


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site: no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/versions"


@router.get("/login")
def login_page(request: Request, next: str | None = None):
    return templates.TemplateResponse(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login")
async def login(request: Request):
    body = await request.body()
    form = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", errors="replace"))
    token, target = form.get("key", [""])[0].strip(), safe_next(form.get("next", [None])[0])
    key = checked_key(request, request.app.state.ctx.settings, token)
    if key is None or "read" not in key.scopes:
        error = "unknown API key" if key is None else f"API key {key.name!r} lacks the 'read' scope"
        return templates.TemplateResponse(request, "login.html", {"next": target, "error": error}, status_code=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse(LOGIN, status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response
