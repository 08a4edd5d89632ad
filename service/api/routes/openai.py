"""OpenAI-compatible ``/v1/completions`` and ``/v1/models``: a thin adapter over the engine, so the
official ``openai`` client works unchanged (errors come as ``{"error": {...}}`` too, see app.py)."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from peer_model.tokenizer import ByteTokenizer

from ...errors import InvalidInput, NotFound
from ..deps import get_host
from ..sampling import sampling_params
from ..schemas import CompletionRequest
from ..streaming import SSE_HEADERS, sse, start_generation

router = APIRouter(tags=["openai"])
tokenizer = ByteTokenizer()
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@router.get("/v1/models")
async def list_models(request: Request, host=Depends(get_host)):
    ctx = request.app.state.ctx
    return {"object": "list", "data": [{
        "id": ctx.settings.model_name, "object": "model", "created": int(request.app.state.started_at),
        "owned_by": "peer-service", "version": host.version_id,
    }]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, host=Depends(get_host)):
    settings = request.app.state.ctx.settings
    if body.model != settings.model_name:
        raise NotFound(f"model {body.model!r} not found; this server serves {settings.model_name!r}")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidInput("exactly one prompt per request is supported")
    if body.echo:
        raise InvalidInput("echo is not supported")
    params = sampling_params(settings, max_tokens=body.max_tokens or 16, temperature=body.temperature
                             if body.temperature is not None else 1.0, top_p=body.top_p or 1.0,
                             stop=body.stop, seed=body.seed)
    prompt_ids = tokenizer.encode(prompts[0])
    generation = start_generation(host, request.app.state.metrics, prompt_ids, params)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def usage() -> dict:
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": generation.completion_tokens,
                "total_tokens": len(prompt_ids) + generation.completion_tokens}

    def chunk(text: str, finish_reason: str | None) -> dict:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": settings.model_name,
                "system_fingerprint": f"version-{generation.ticket.version_id}",
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

    if not body.stream:
        text = await generation.text()
        return {**chunk(text, OPENAI_FINISH[generation.finish_reason]), "usage": usage()}

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events():
        try:
            async for step in generation.steps():
                reason = OPENAI_FINISH[step.finish_reason] if step.finish_reason else None
                if step.text or reason:
                    yield sse(chunk(step.text, reason))
            if include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": usage()})
        except Exception as exc:  # noqa: BLE001 - the stream must end with a terminal event
            yield sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                 "type": "server_error", "code": 500}})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
