"""FastAPI routes: the OpenAI API, health, metrics and the radix-cache admin endpoints."""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from gateway import generation, responses
from gateway.api import anthropic_messages, openai_responses
from gateway.chat import output_grammar, plan_chat
from gateway.config import Config
from gateway.engine.engine import EngineUnavailable
from gateway.errors import APIError, engine_unavailable, install_error_handlers
from gateway.metrics import Metrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest, new_id, now_s
from gateway.router import Router
from gateway.tools import parse_tools


class RequestCounter:
    """Counts requests by path and status as plain ASGI: it only watches the response start.

    (Starlette's @app.middleware("http") re-streams every response body through a memory
    stream, a measurable cost per SSE chunk on a CPU host where the model needs every core.)
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def watch(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, watch)


def create_app(config: Config, router: Router) -> FastAPI:
    """The app serving `router`'s models; engines start and stop with the app."""
    metrics = Metrics()
    keys = set(config.server.api_keys)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        router.attach(asyncio.get_running_loop())
        yield
        router.stop()

    app = FastAPI(title="radixgate", lifespan=lifespan)
    install_error_handlers(app)

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer ") and header[7:] in keys:
            return
        if request.headers.get("x-api-key") in keys:      # Anthropic clients send the key this way
            return
        raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")

    app.add_middleware(RequestCounter, metrics=metrics)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = router.get(body.model)
        tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        plan = await plan_chat(model, [m.template_message() for m in body.messages], tools,
                               output_grammar(body.response_format))
        max_new = generation.resolve_max_tokens(body.max_completion_tokens or body.max_tokens, len(plan.prompt),
                                                model.engine.context_length)
        handle = generation.submit(model, [plan.prompt], body, max_new, body.logprobs, body.top_logprobs or 0,
                                   plan.grammar)
        rid, created, started = new_id("chatcmpl"), now_s(), time.monotonic()
        if body.stream:
            return EventSourceResponse(_chat_stream(handle, body, model, rid, created, started, tools),
                                       ping=15)
        results = await generation.collect(handle, body.n, request)
        metrics.latency.labels(body.model).observe(time.monotonic() - started)
        reply = responses.chat_completion(rid, created, body.model, results, model.tokenizer, body.logprobs)
        if tools is not None:
            for choice in reply["choices"]:
                responses.attach_tool_calls(choice, tools.names)
        return reply

    async def _chat_stream(handle, body, model, rid, created, started, tools):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices, usage_block=None):
            return json.dumps(responses.stream_chunk("chat.completion.chunk", rid, created, body.model, choices,
                                                     usage_block, include_usage))

        for index in range(body.n):
            yield {"data": chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}])}
        totals = [generation.ChoiceResult() for _ in range(body.n)]
        calls = [responses.ToolCallDeltas(tools.names) if tools else None for _ in range(body.n)]
        first = True
        async for event in generation.stream_events(handle):
            if event.error:
                yield {"data": json.dumps(responses.stream_error(event.error))}
                return
            generation.merge(totals[event.index], event)
            delta = {"content": event.text} if event.text else {}
            finish = event.finish_reason
            if calls[event.index] is not None:    # text that forms a tool call leaves as tool_calls deltas
                delta, finish = calls[event.index].delta(event.text, finish)
            if not delta and finish is None and not (body.logprobs and event.logprobs):
                continue
            if first:
                metrics.ttft.labels(body.model).observe(time.monotonic() - started)
                first = False
            yield {"data": chunk([{
                "index": event.index, "delta": delta,
                "logprobs": responses.chat_logprobs(model.tokenizer, event.logprobs) if body.logprobs else None,
                "finish_reason": finish}])}
        metrics.latency.labels(body.model).observe(time.monotonic() - started)
        if include_usage:
            yield {"data": chunk([], responses.usage_of(totals, 1, body.n))}
        yield {"data": "[DONE]"}

    openai_responses.register(app, router, [Depends(authorize)])
    anthropic_messages.register(app, router, [Depends(authorize)])

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        model = router.get(body.model)
        prompts = _prompt_ids(body.prompt, model)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        longest = max(len(p) for p in prompts)
        max_new = generation.resolve_max_tokens(body.max_tokens, longest, model.engine.context_length)
        want_logprobs = body.logprobs is not None
        handle = generation.submit(model, prompts, body, max_new, want_logprobs, body.logprobs or 0)
        prefixes = [model.tokenizer.decode(p) if body.echo else "" for p in prompts]
        rid, created, started = new_id("cmpl"), now_s(), time.monotonic()
        if body.stream:
            return EventSourceResponse(_text_stream(handle, body, model, rid, created, prefixes, len(prompts)),
                                       ping=15)
        results = await generation.collect(handle, len(prompts) * body.n, request)
        metrics.latency.labels(body.model).observe(time.monotonic() - started)
        return responses.text_completion(rid, created, body.model, results, model.tokenizer, want_logprobs,
                                         prefixes, len(prompts), body.n)

    async def _text_stream(handle, body, model, rid, created, prefixes, num_prompts):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        totals = [generation.ChoiceResult() for _ in range(num_prompts * body.n)]
        sent_prefix = set()
        async for event in generation.stream_events(handle):
            if event.error:
                yield {"data": json.dumps(responses.stream_error(event.error))}
                return
            generation.merge(totals[event.index], event)
            text = event.text
            if event.index not in sent_prefix:
                sent_prefix.add(event.index)
                text = prefixes[event.index // body.n] + text
            if not text and event.finish_reason is None:
                continue
            logprobs = (responses.text_logprobs(model.tokenizer, event.logprobs, 0)
                        if body.logprobs is not None else None)
            yield {"data": json.dumps(responses.stream_chunk("text_completion", rid, created, body.model, [{
                "index": event.index, "text": text, "logprobs": logprobs,
                "finish_reason": event.finish_reason}], None, include_usage))}
        if include_usage:
            yield {"data": json.dumps(responses.stream_chunk(
                "text_completion", rid, created, body.model, [], responses.usage_of(totals, num_prompts, body.n),
                True))}
        yield {"data": "[DONE]"}

    def _prompt_ids(prompt, model) -> list[list[int]]:
        if isinstance(prompt, str):
            return [model.tokenizer.encode(prompt)]
        if all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [model.tokenizer.encode(p) for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        vocab = model.info.vocab_size
        for ids in prompts:
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be within 0..{vocab - 1}", param="prompt")
        return prompts

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [_model_card(name) for name in router.models]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def get_model(name: str):
        router.get(name)
        return _model_card(name)

    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "radixgate"}

    async def _snapshots() -> dict[str, dict]:
        names = list(router.models)
        snaps = await asyncio.gather(*(_snapshot(n) for n in names))
        return dict(zip(names, snaps, strict=True))

    async def _snapshot(name: str) -> dict:
        try:
            return await router.models[name].engine.call("snapshot")
        except EngineUnavailable as error:
            return {"error": str(error)}

    @app.get("/health")
    async def health():
        snaps = await _snapshots()
        models = {}
        for name, snap in snaps.items():
            info = router.models[name].info
            models[name] = {"backend": info.backend, "device": info.device, "dtype": info.dtype,
                            "context_length": router.models[name].engine.context_length, **snap}
        first = next(iter(models.values()), {})
        healthy = all("error" not in snap for snap in snaps.values())
        body = {"status": "ok" if healthy else "unavailable", "models": models,
                "radix_cache_stats": first.get("radix_cache_stats", {}),
                "attention_sparsity_ratio": first.get("attention_sparsity_ratio", 0.0)}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        snaps = {name: snap for name, snap in (await _snapshots()).items() if "error" not in snap}
        return Response(metrics.render(snaps), media_type="text/plain; version=0.0.4")

    @app.get("/debug/radix_stats")
    async def radix_stats():
        snaps = await _snapshots()
        return {name: snap.get("radix_cache_stats", snap) for name, snap in snaps.items()}

    @app.post("/clear_radix_cache", dependencies=[Depends(authorize)])
    async def clear_radix_cache():
        try:
            freed = {name: await m.engine.call("reset_cache") for name, m in router.models.items()}
        except EngineUnavailable as error:
            raise engine_unavailable("A model", error) from None
        return JSONResponse({"status": "ok", "pages_freed": freed})

    return app
