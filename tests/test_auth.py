"""API keys: Bearer (or Anthropic's x-api-key) on every API route, keys on /metrics and /debug, an admin
key for the admin route, /health open; keys from the environment, compared in constant time, never logged."""
from __future__ import annotations

import hmac
import logging

import anthropic
import httpx
import openai
import pytest

from gateway.auth import KeyRing
from gateway.config import ConfigError, parse_config
from gateway.litellm_config import from_litellm
from tests.conftest import MODEL, model_config, start_server

USER_KEY, NAMED_KEY, ADMIN_KEY = "sk-user-3c9f1e", "sk-named-77ab20", "sk-admin-5d0e91"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
API_ROUTES = [("POST", "/v1/chat/completions", CHAT),
              ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
              ("POST", "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 2}),
              ("POST", "/v1/messages", CHAT),
              ("GET", "/v1/models", None),
              ("GET", f"/v1/models/{MODEL}", None)]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def server(request):
    patch = pytest.MonkeyPatch()
    patch.setenv("RADIXGATE_TEST_USER_KEY", USER_KEY)
    config = model_config(kv_cache={"num_pages": 256})
    config["server"] = {"api_keys": ["os.environ/RADIXGATE_TEST_USER_KEY", {"key": NAMED_KEY, "name": "team-a"}],
                        "admin_keys": [ADMIN_KEY]}
    live = start_server(config)
    yield live
    live.stop()
    patch.undo()


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_every_api_route_needs_a_key(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for method, path, body in API_ROUTES:
            for headers in ({}, bearer("sk-wrong"), bearer(USER_KEY[:-1]), {"authorization": USER_KEY}):
                answer = http.request(method, path, json=body, headers=headers)
                assert answer.status_code == 401, (path, headers, answer.text)
                if path == "/v1/messages":
                    assert answer.json()["error"]["type"] == "authentication_error"
                else:
                    assert answer.json()["error"]["code"] == "invalid_api_key"
            for key in (USER_KEY, NAMED_KEY, ADMIN_KEY):
                answer = http.request(method, path, json=body, headers=bearer(key))
                assert answer.status_code == 200, (path, answer.text)
            # Anthropic's header works everywhere; the scheme is case-insensitive
            assert http.request(method, path, json=body, headers={"x-api-key": USER_KEY}).status_code == 200
            lower = {"authorization": f"bearer {NAMED_KEY}"}
            assert http.request(method, path, json=body, headers=lower).status_code == 200
        assert http.get("/v1/nothing-here").status_code == 401          # unknown paths are not a way around
    server.wait_idle()


def test_sdks_send_their_keys(server):
    good = openai.OpenAI(base_url=server.base_url, api_key=USER_KEY, max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    claude = anthropic.Anthropic(base_url=server.url, api_key=NAMED_KEY, max_retries=0)      # sends x-api-key
    reply = claude.messages.create(model=MODEL, max_tokens=4, messages=CHAT["messages"])
    assert reply.content[0].type == "text"
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=CHAT["messages"])
    assert caught.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                            "message": caught.value.body["error"]["message"]}}
    server.wait_idle()


def test_health_open_metrics_and_debug_need_a_key_admin_route_an_admin_key(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        for path in ("/metrics", "/debug/radix_stats"):
            assert http.get(path).status_code == 401
            assert http.get(path, headers=bearer("sk-wrong")).status_code == 401
            assert http.get(path, headers=bearer(USER_KEY)).status_code == 200
            assert http.get(path, headers=bearer(ADMIN_KEY)).status_code == 200
        assert http.post("/clear_radix_cache").status_code == 401
        refused = http.post("/clear_radix_cache", headers=bearer(NAMED_KEY))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        assert "team-a" in refused.json()["error"]["message"]
        cleared = http.post("/clear_radix_cache", headers=bearer(ADMIN_KEY))
        assert cleared.status_code == 200 and cleared.json()["status"] == "ok"


def test_without_admin_keys_any_key_is_admin():
    ring = KeyRing(parse_config({"server": {"api_keys": [USER_KEY]}}).server)
    assert ring.authorize("/clear_radix_cache", bearer(USER_KEY)).name == "key-1"
    ring = KeyRing(parse_config({}).server)
    assert not ring.enabled and ring.authorize("/v1/chat/completions", {}).admin


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared, whichever matches (no early exit), on digests of equal length."""
    ring = KeyRing(parse_config({"server": {"api_keys": [USER_KEY, NAMED_KEY], "admin_keys": [ADMIN_KEY]}}).server)
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, name in ((USER_KEY, "key-1"), (ADMIN_KEY, "admin-1"), ("x", None), ("", None), (None, None)):
        compared.clear()
        caller = ring.identify(presented)
        assert (caller.name if caller else None) == name
        assert compared == [(32, 32)] * 3


def test_keys_from_the_environment_one_resolver(monkeypatch):
    monkeypatch.setenv("RADIXGATE_TEST_KEY", "sk-env")
    monkeypatch.setenv("RADIXGATE_TEST_KEY_ADMIN", "sk-env-admin")
    config = parse_config({"server": {"api_keys": ["os.environ/RADIXGATE_TEST_KEY", {"key": "sk-x", "name": "x"}],
                                      "admin_keys": ["os.environ/RADIXGATE_TEST_KEY_ADMIN"]}})
    assert config.server.api_keys[0] == "sk-env" and config.server.admin_keys == ["sk-env-admin"]
    monkeypatch.delenv("RADIXGATE_TEST_KEY_ADMIN")
    for server in ({"admin_keys": ["os.environ/RADIXGATE_TEST_KEY_ADMIN"]},
                   {"api_keys": [{"key": "os.environ/RADIXGATE_TEST_KEY_ADMIN"}]}):
        with pytest.raises(ConfigError, match="RADIXGATE_TEST_KEY_ADMIN, which is not set"):
            parse_config({"server": server})
    # LiteLLM's master_key goes through the same resolver
    litellm = {"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x"}}],
               "general_settings": {"master_key": "os.environ/RADIXGATE_TEST_KEY"}}
    assert from_litellm(litellm)[0].server.api_keys == ["sk-env"]
    monkeypatch.delenv("RADIXGATE_TEST_KEY")
    with pytest.raises(ConfigError, match="RADIXGATE_TEST_KEY, which is not set"):
        from_litellm(litellm)


def test_config_errors_name_positions_not_keys():
    for server in ({"api_keys": [USER_KEY, USER_KEY]}, {"api_keys": [USER_KEY], "admin_keys": [USER_KEY]},
                   {"api_keys": [{"key": USER_KEY, "name": "a"}, {"key": NAMED_KEY, "name": "a"}]}):
        with pytest.raises(ConfigError) as caught:
            parse_config({"server": server})
        assert USER_KEY not in str(caught.value) and NAMED_KEY not in str(caught.value)
    assert USER_KEY not in repr(parse_config({"server": {"api_keys": [{"key": USER_KEY}]}}).server.api_keys[0])


def test_keys_never_reach_logs_or_error_bodies(server):
    records = Records()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.access", "uvicorn.error", "radixgate")]
    levels = [logger.level for logger in loggers]
    logging.getLogger().addHandler(records)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    bodies = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for key in (USER_KEY, NAMED_KEY, ADMIN_KEY, USER_KEY + "x", "sk-wrong"):
                for method, path, body in API_ROUTES[:1] + [("POST", "/clear_radix_cache", None),
                                                              ("GET", "/metrics", None)]:
                    bodies.append(http.request(method, path, json=body, headers=bearer(key)).text)
                bodies.append(http.post("/v1/messages", json=CHAT, headers={"x-api-key": key}).text)
    finally:
        logging.getLogger().removeHandler(records)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    assert records.lines, "the loggers were silent: nothing was checked"
    for text in records.lines + bodies:
        for key in (USER_KEY, NAMED_KEY, ADMIN_KEY):
            assert key not in text
    server.wait_idle()
