"""POST /v1/generate (JSON or server-sent events) and POST /v1/tokenize."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..deps import get_host
from ..ratelimit import token_budget
from ..sampling import check_prompt_chars, sampling_params
from ..schemas import GenerateRequest, GenerateResponse
from ..security import Caller, require_scope
from ..streaming import SSE_HEADERS, served_warning, sse, start_generation, warning_headers
from ..text import Text

router = APIRouter(tags=["generation"])


@router.post("/v1/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
async def generate(body: GenerateRequest, request: Request, response: Response, host=Depends(get_host),
                   caller: Caller = Depends(require_scope("generate"))):
    """Complete a prompt. With ``stream=true`` the answer is ``text/event-stream``: one ``token`` event per
    sampled token (``{"text", "version"}``), then one ``done`` event (finish reason, token counts, version,
    latency, warning) or, if generation fails, one ``error`` event. Closing the connection cancels the
    generation. While the serving version is untrained (a fresh model before its bootstrap job is done),
    ``warning`` says so with the training job's progress, as does the ``X-PEER-Warning`` header."""
    settings = request.app.state.ctx.settings
    check_prompt_chars(settings, body.prompt)
    params = sampling_params(settings, max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                             top_p=body.top_p, stop=body.stop, seed=body.seed)
    async with token_budget(request, caller.client, params.max_tokens):  # given back if not admitted
        generation = start_generation(host, request.app.state.metrics,
                                      lambda tokenizer: tokenizer.encode(body.prompt), params)
    version = generation.ticket.version_id
    warning = await served_warning(request.app.state.ctx, generation)

    def summary() -> dict:
        return {"finish_reason": generation.finish_reason, "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens, "version": version,
                "latency_ms": round(generation.latency_ms, 2), "warning": warning}

    if not body.stream:
        text = await generation.text()
        response.headers.update(warning_headers(warning))
        return GenerateResponse(text=text, **summary())

    async def events():
        try:
            async for step in generation.steps():
                if step.text:
                    yield sse({"text": step.text, "version": version}, "token")
            yield sse(summary(), "done")
        except Exception as exc:  # noqa: BLE001 - a stream ends with a terminal event, also on error
            yield sse({"message": f"generation failed: {type(exc).__name__}: {exc}", "version": version}, "error")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **warning_headers(warning)})


class TokenizeRequest(BaseModel):
    text: Text


@router.post("/v1/tokenize", dependencies=[Depends(require_scope("generate"))])
async def tokenize(body: TokenizeRequest, request: Request, host=Depends(get_host)):
    """The ids of the served version's tokenizer (``tokenizer``: "byte" or "hf"), as a prompt is encoded;
    generation puts that tokenizer's BOS (``bos``) before them when the tokenizer adds one (``add_bos``)."""
    check_prompt_chars(request.app.state.ctx.settings, body.text)
    version, tokenizer = host.active_tokenizer()
    ids = tokenizer.encode(body.text)
    return {"tokens": ids, "count": len(ids), "version": version, "tokenizer": tokenizer.kind,
            "bos": tokenizer.bos_id, "add_bos": tokenizer.add_bos}
