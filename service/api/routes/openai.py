"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``: a thin adapter over the
engine, so the official ``openai`` client works unchanged (errors come as ``{"error": {...}}`` too, see
app.py). Token counts (``usage``) are in the serving model's tokens; ``system_fingerprint`` names the
version that served the request."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from ...errors import InvalidInput, NotFound
from ...settings import Settings
from ..chat import chat_prompt_ids, chat_stops
from ..deps import get_host
from ..ratelimit import token_budget
from ..sampling import check_prompt_chars, sampling_params
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..security import Caller, require_scope
from ..streaming import SSE_HEADERS, Generation, served_warning, sse, start_generation, warning_headers

router = APIRouter(tags=["openai"])
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
Chunk = Callable[[str, str | None], dict]  # (text, finish reason) → one response object


@router.get("/v1/models", dependencies=[Depends(require_scope("read"))])
async def list_models(request: Request, host=Depends(get_host)):
    ctx = request.app.state.ctx
    return {"object": "list", "data": [{
        "id": ctx.settings.model_name, "object": "model", "created": int(request.app.state.started_at),
        "owned_by": "peer-service", "version": host.version_id,
    }]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, http_response: Response,
                      host=Depends(get_host), caller: Caller = Depends(require_scope("generate"))):
    settings = request.app.state.ctx.settings
    check_model(settings, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidInput("exactly one prompt per request is supported")
    if body.echo:
        raise InvalidInput("echo is not supported")
    check_prompt_chars(settings, prompts[0])
    params = sampling_params(settings, max_tokens=body.max_tokens or 16, temperature=body.temperature
                             if body.temperature is not None else 1.0, top_p=body.top_p or 1.0,
                             stop=body.stop, seed=body.seed)
    async with token_budget(request, caller.client, params.max_tokens):  # given back if not admitted
        generation = start_generation(host, request.app.state.metrics,
                                      lambda tokenizer: tokenizer.encode(prompts[0]), params)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    warning = await served_warning(request.app.state.ctx, generation)

    def chunk(text: str, finish_reason: str | None) -> dict:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": settings.model_name,
                "system_fingerprint": f"version-{generation.ticket.version_id}",
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

    if not body.stream:
        text = await generation.text()
        http_response.headers.update(warning_headers(warning))
        return {**chunk(text, OPENAI_FINISH[generation.finish_reason]), "usage": usage(generation)}
    return stream(generation, chunk, body.stream_options, warning=warning)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, http_response: Response,
                           host=Depends(get_host), caller: Caller = Depends(require_scope("generate"))):
    """The chat is rendered by the serving model's chat template (a plain "System: / User: / Assistant:"
    transcript when it has none, see service/api/chat.py); the answer ends at the model's end of turn (the
    transcript's: the start of a "User:" line, which then counts as one of the stop strings)."""
    settings = request.app.state.ctx.settings
    check_model(settings, body.model)
    if body.logprobs:
        raise InvalidInput("logprobs are not supported")
    check_prompt_chars(settings, *(message.content for message in body.messages))
    stop = chat_stops(host.active_tokenizer()[1], body.stop)  # a swap in between changes only where it stops
    params = sampling_params(settings, max_tokens=body.max_completion_tokens or body.max_tokens,
                             temperature=body.temperature if body.temperature is not None else 1.0,
                             top_p=body.top_p or 1.0, stop=stop, seed=body.seed)
    async with token_budget(request, caller.client, params.max_tokens):  # given back if not admitted
        generation = start_generation(host, request.app.state.metrics,
                                      lambda tokenizer: chat_prompt_ids(tokenizer, body.messages), params)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    warning = await served_warning(request.app.state.ctx, generation)

    def response(object_type: str, choice: dict) -> dict:
        return {"id": completion_id, "object": object_type, "created": created, "model": settings.model_name,
                "system_fingerprint": f"version-{generation.ticket.version_id}",
                "choices": [{"index": 0, "logprobs": None, **choice}]}

    if not body.stream:
        text = await generation.text()
        http_response.headers.update(warning_headers(warning))
        return {**response("chat.completion", {"message": {"role": "assistant", "content": text},
                                               "finish_reason": OPENAI_FINISH[generation.finish_reason]}),
                "usage": usage(generation)}

    def chunk(text: str, finish_reason: str | None) -> dict:
        return response("chat.completion.chunk", {"delta": {"content": text} if text else {},
                                                  "finish_reason": finish_reason})

    first = response("chat.completion.chunk", {"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    return stream(generation, chunk, body.stream_options, first, warning)


def check_model(settings: Settings, model: str) -> None:
    if model != settings.model_name:
        raise NotFound(f"model {model!r} not found; this server serves {settings.model_name!r}")


def usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def stream(generation: Generation, chunk: Chunk, stream_options: dict | None, first: dict | None = None,
           warning: str | None = None):
    """Server-sent chunks: ``first`` (if any), one per step with text or the finish reason, the usage when
    ``stream_options.include_usage``, then ``[DONE]``; an error is a terminal ``{"error": ...}`` chunk.
    ``warning`` (an untrained model) goes in the X-PEER-Warning header."""
    include_usage = bool((stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield sse(first)
            async for step in generation.steps():
                reason = OPENAI_FINISH[step.finish_reason] if step.finish_reason else None
                if step.text or reason:
                    yield sse(chunk(step.text, reason))
            if include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": usage(generation)})
        except Exception as exc:  # noqa: BLE001 - the stream must end with a terminal event
            yield sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                 "type": "server_error", "code": 500}})
        finally:
            generation.ticket.cancel()  # a client gone before the first step: its generation stops too
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **warning_headers(warning)})
