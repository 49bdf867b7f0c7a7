"""FastAPI routes: the OpenAI API, health, metrics and the radix-cache admin endpoints."""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway import generation, openapi, responses
from gateway.api import anthropic_messages, openai_responses
from gateway.auth import KeyRing
from gateway.config import Config
from gateway.engine.engine import EngineUnavailable
from gateway.errors import engine_unavailable, install_error_handlers
from gateway.gate import Gate, ParsedBodyRoute, track
from gateway.metrics import Metrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest, new_id, now_s
from gateway.router import Router
from gateway.services.base import ChatCall, TextCall
from gateway.shutdown import Drain, DrainMiddleware
from gateway.sse import Batch, DeltaEventResponse
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
    drain = Drain(config.server.shutdown_grace_s, router)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        router.attach(asyncio.get_running_loop())
        drain.attach(asyncio.get_running_loop())
        yield
        router.stop()

    app = FastAPI(title="radixgate", lifespan=lifespan)
    app.router.route_class = ParsedBodyRoute         # routes read the JSON the gate parsed
    app.state.drain = drain          # `radixgate serve` drains on SIGTERM (gateway/shutdown.py)
    install_error_handlers(app)
    openapi.install(app)             # /openapi.json lists every status each route answers

    # keys, per-key limits and input limits, before a body is parsed (gateway/gate.py); innermost
    app.add_middleware(Gate, keys=KeyRing(config.server), limits=config.server.limits)
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        service = router.service(body.model)
        tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        call = ChatCall([m.template_message() for m in body.messages], body,
                        body.max_completion_tokens or body.max_tokens, tools, body.response_format,
                        logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, stream=body.stream)
        rid, created, started = new_id("chatcmpl"), now_s(), time.monotonic()
        stream = track(request, await generation.unless_gone(service.chat(call), request))
        if body.stream:
            return DeltaEventResponse(_chat_stream(stream, body, rid, created, started), stream)
        results = await generation.collect(stream, body.n, request)
        metrics.latency.labels(body.model).observe(time.monotonic() - started)
        return responses.chat_completion(rid, created, body.model, results, stream.usage, body.logprobs)

    async def _chat_stream(stream, body, rid, created, started):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices, usage_block=None):
            return json.dumps(responses.stream_chunk("chat.completion.chunk", rid, created, body.model, choices,
                                                     usage_block, include_usage))

        # the role chunks go out with the first content (one write, not two), the tail in one more
        opening = [{"data": chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}])} for index in range(body.n)]
        calls_sent = [0] * body.n
        async for delta in stream:
            if delta.error:
                yield Batch([*opening, {"data": json.dumps(responses.stream_error(delta.error))}], final=True)
                return
            out = {"content": delta.text} if delta.text else {}
            if delta.tool_calls:
                out["tool_calls"] = responses.tool_call_deltas(delta.tool_calls, calls_sent[delta.index])
                calls_sent[delta.index] += len(delta.tool_calls)
            if not out and delta.finish_reason is None and not (body.logprobs and delta.logprobs):
                continue
            event = {"data": chunk([{
                "index": delta.index, "delta": out,
                "logprobs": responses.chat_logprobs(delta.logprobs) if body.logprobs else None,
                "finish_reason": delta.finish_reason}])}
            if opening:
                metrics.ttft.labels(body.model).observe(time.monotonic() - started)
                yield Batch([*opening, event])
                opening = []
            else:
                yield event
        metrics.latency.labels(body.model).observe(time.monotonic() - started)
        tail = [{"data": chunk([], responses.usage_of(stream.usage))}] if include_usage else []
        yield Batch([*opening, *tail, {"data": "[DONE]"}], final=True)

    openai_responses.register(app, router)
    anthropic_messages.register(app, router)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service = router.service(body.model)
        call = TextCall(body.prompt, body, body.max_tokens, body.logprobs, body.echo, body.stream)
        rid, created, started = new_id("cmpl"), now_s(), time.monotonic()
        stream = track(request, await generation.unless_gone(service.complete(call), request))
        num_choices = (len(body.prompt) if _many_prompts(body.prompt) else 1) * body.n
        if body.stream:
            return DeltaEventResponse(_text_stream(stream, body, rid, created), stream)
        results = await generation.collect(stream, num_choices, request)
        metrics.latency.labels(body.model).observe(time.monotonic() - started)
        return responses.text_completion(rid, created, body.model, results, stream.usage, body.logprobs is not None)

    async def _text_stream(stream, body, rid, created):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        async for delta in stream:
            if delta.error:
                yield {"data": json.dumps(responses.stream_error(delta.error))}
                return
            if not delta.text and delta.finish_reason is None:
                continue
            logprobs = responses.text_logprobs(delta.logprobs, 0) if body.logprobs is not None else None
            yield {"data": json.dumps(responses.stream_chunk("text_completion", rid, created, body.model, [{
                "index": delta.index, "text": delta.text, "logprobs": logprobs,
                "finish_reason": delta.finish_reason}], None, include_usage))}
        tail = [{"data": json.dumps(responses.stream_chunk(
            "text_completion", rid, created, body.model, [], responses.usage_of(stream.usage), True))}] \
            if include_usage else []
        yield Batch([*tail, {"data": "[DONE]"}], final=True)

    def _many_prompts(prompt) -> bool:
        """A list of texts or of token-id lists is several prompts; one text or one id list is one."""
        return isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(name) for name in router.services]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        router.service(name)
        return _model_card(name)

    def _model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "radixgate"}
        if router.model_info.get(name):
            card["model_info"] = router.model_info[name]
        return card

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
        healthy = all("error" not in snap for snap in snaps.values()) and not drain.draining
        status = "draining" if drain.draining else "ok" if healthy else "unavailable"
        body = {"status": status, "models": models,
                "radix_cache_stats": first.get("radix_cache_stats", {}),
                "attention_sparsity_ratio": first.get("attention_sparsity_ratio", 0.0),
                "remote_models": {name: service.describe() for name, service in router.services.items()
                                  if name not in router.models}}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        snaps = {name: snap for name, snap in (await _snapshots()).items() if "error" not in snap}
        return Response(metrics.render(snaps), media_type="text/plain; version=0.0.4")

    @app.get("/debug/radix_stats")
    async def radix_stats():
        snaps = await _snapshots()
        return {name: snap.get("radix_cache_stats", snap) for name, snap in snaps.items()}

    @app.post("/clear_radix_cache")
    async def clear_radix_cache():
        try:
            freed = {name: await m.engine.call("reset_cache") for name, m in router.models.items()}
        except EngineUnavailable as error:
            raise engine_unavailable("A model", error) from None
        return JSONResponse({"status": "ok", "pages_freed": freed})

    return app
