"""Signing in to the console, and who may see its pages.

The console's pages are rendered on the server and its script calls the JSON API from the same origin. A
browser following a link cannot send a bearer header, so the console signs in once: /ui/login takes an API
key and opens a session (service/api/sessions.py: an expiring, revocable server-side session whose signed,
opaque id is the cookie; the key never goes back to the browser); the pages and the script's API calls then act
with that key's scopes. A proxy or curl may send ``Authorization: Bearer`` instead.

With PEER_REQUIRE_KEY_FOR=all the pages show what the ``read`` scope shows, so they need a session (or a bearer
key) with it; with PEER_REQUIRE_KEY_FOR=write (the default) reading is open and so are the pages, and signing in
is what the actions (activate, cancel, upload) need.
"""
from __future__ import annotations

from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from ..api.security import checked_key, key_required, request_key
from ..api.sessions import COOKIE, open_session, revoke_session
from .rendering import templates

LOGIN = "/ui/login"
MAX_FORM_BYTES = 4096

router = APIRouter(prefix="/ui", tags=["console"], default_response_class=HTMLResponse)
LOGIN_FORM = {"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "required": ["key"],
    "properties": {"key": {"type": "string"}, "next": {"type": "string", "description": "a console path"}}}}}}}


def console_reader(request: Request) -> None:
    """The dependency of every console page: a 303 to the login page unless the caller may read."""
    settings = request.app.state.ctx.settings
    if not key_required(settings, "read"):
        return
    key = request_key(request, settings, required=True)  # a wrong key or a forged cookie is a guess: charged
    if key is None or "read" not in key.scopes:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "sign in with an API key that has the 'read' scope",
                            headers={"Location": f"{LOGIN}?next={quote(target, safe='')}"})


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site: no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/versions"


def login_form(request: Request, target: str, error: str | None = None, status_code: int = 200):
    settings = request.app.state.ctx.settings
    return templates.TemplateResponse(request, "login.html", {
        "next": target, "error": error, "keys": bool(settings.api_keys),
        "read_required": key_required(settings, "read"),
        "session_hours": round(settings.console_session_seconds / 3600, 1)}, status_code=status_code)


@router.get("/login")
def login_page(request: Request, next: str | None = None):
    return login_form(request, safe_next(next))


@router.post("/login", openapi_extra=LOGIN_FORM)
async def login(request: Request):
    """Open a session for the key typed in the form; 401 with the reason for an unknown key or, where reading
    needs a key, one without the ``read`` scope."""
    settings = request.app.state.ctx.settings
    body = await request.body()
    form = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", errors="replace"))
    token, target = form.get("key", [""])[0].strip(), safe_next(form.get("next", [None])[0])
    key = checked_key(request, settings, token)
    if key is None or (key_required(settings, "read") and "read" not in key.scopes):
        error = "unknown API key" if key is None else f"API key {key.name!r} lacks the 'read' scope"
        return login_form(request, target, error, status_code=401)
    cookie = await run_in_threadpool(open_session, settings, request.app.state.ctx.sessions, key)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, cookie, max_age=int(settings.console_session_seconds), httponly=True,
                        samesite="strict", path="/",
                        secure=settings.public_scheme == "https" or request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request):
    """End the session (on the server: the cookie is worth nothing from now on, wherever a copy of it is)."""
    ctx = request.app.state.ctx
    cookie = request.cookies.get(COOKIE)
    if cookie:
        revoke_session(ctx.settings, ctx.sessions, cookie)
    response = RedirectResponse(LOGIN, status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response
