"""Over real HTTP (uvicorn on loopback): the official openai client works unchanged, streaming included;
versions swap under concurrent load without a failed request or a response mixing two versions."""
from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest
import torch

from peer_model.config import ModelConfig
from peer_model.generate import SamplingParams, generate_text
from peer_model.model import PEERTransformer
from peer_model.tokenizer import ByteTokenizer
from service.api.app import create_app
from service.context import ServiceContext
from service.db.models import PoolVersion
from service.db.session import transaction
from service.store.store import Store
from service.store.versions import describe_pools

from .conftest import ServerThread, tiny_settings

PROMPTS = ["the", "a cat", "we", "zork", "on the hill", "QUAX-9X7", "12"]


@pytest.fixture(scope="module")
def server(pg_url, tmp_path_factory):
    settings = tiny_settings(tmp_path_factory.mktemp("home"), pg_url, swap_poll_seconds=0.05)
    with ServerThread(create_app(settings, dispatch=lambda job: None)) as server:
        yield server, settings


@pytest.fixture(scope="module")
def two_versions(server):
    """Version 1 (fresh) and version 2: the same shape with other weights, published by hand; and the
    greedy completion of every prompt by each, computed by the library on its checkpoint."""
    _, settings = server
    ctx = ServiceContext.from_settings(settings)
    with ctx.sessions() as session:
        first = session.get(PoolVersion, 1)
    torch.manual_seed(7)
    model = PEERTransformer(ModelConfig.from_dict(first.model_config_json))
    ctx.store.save_model("versions/perturbed", model)
    experts, segments = describe_pools(model, first.segments, [])
    with transaction(ctx.sessions) as session:
        second = PoolVersion(parent_id=1, checkpoint="versions/perturbed", model_config_json=first.model_config_json,
                             experts=experts, segments=segments, corpus_ids=[])
        session.add(second)
        session.flush()
        second_id = second.id
    ctx.close()
    greedy = {}
    for version_id, key in ((1, first.checkpoint), (second_id, "versions/perturbed")):
        reference = Store(settings.resolved_store_dir).load_model(key)
        greedy[version_id] = {p: generate_text(reference, ByteTokenizer(), p, SamplingParams(max_tokens=24,
                                                                                              temperature=0)).text
                              for p in PROMPTS}
    assert sum(greedy[1][p] != greedy[second_id][p] for p in PROMPTS) >= 3  # the versions are distinguishable
    return greedy


def test_openai_client_completions_models_and_errors(server):
    srv, settings = server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [settings.model_name]
    completion = client.completions.create(model="peer", prompt="the", max_tokens=12, temperature=0, seed=1)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="peer", prompt="the", max_tokens=12, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == 12
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="top_p"):
        client.completions.create(model="peer", prompt="x", max_tokens=2, top_p=0)


def test_byte_level_model_answers_chat_completions_on_a_plain_transcript(server):
    """No chat template: the chat becomes "System: ...\nUser: ...\nAssistant:" in bytes."""
    srv, settings = server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    transcript = "System: Be brief.\nUser: Hi\nAssistant:"
    completion = client.chat.completions.create(model=settings.model_name, messages=messages, max_tokens=8,
                                                temperature=0)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and choice.message.role == "assistant"
    assert completion.usage.prompt_tokens == len(transcript.encode())
    chunks = list(client.chat.completions.create(model=settings.model_name, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_hot_swap_under_load_fails_no_request_and_never_mixes_versions(server, two_versions):
    srv, _ = server
    versions = sorted(two_versions)
    stop = threading.Event()
    swaps: list[int] = []

    def flip() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            while not stop.is_set():
                target = versions[len(swaps) % 2]
                assert http.post(f"/v1/versions/{target}/activate").status_code == 200
                swaps.append(target)

    async def client(index: int) -> list[tuple[str, dict]]:
        results = []
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            for n in range(12):
                prompt = PROMPTS[(index + n) % len(PROMPTS)]
                response = await http.post("/v1/generate", json={"prompt": prompt, "max_tokens": 24, "temperature": 0})
                assert response.status_code == 200, response.text
                results.append((prompt, response.json()))
        return results

    async def load():
        return await asyncio.gather(*(client(i) for i in range(8)))

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        results = [r for rs in asyncio.run(load()) for r in rs]
    finally:
        stop.set()
        flipper.join()
    assert len(swaps) >= 4
    served = {body["version"] for _, body in results}
    assert served == set(versions)  # both versions answered during the run
    for prompt, body in results:  # each response is exactly its version's own greedy completion
        assert body["text"] == two_versions[body["version"]][prompt]
