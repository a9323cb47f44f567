"""The remote backend's parts, against OpenAI-shaped servers on 127.0.0.1: its settings, how requests are spread
over servers and moved off failing ones, and a streamed reply passed on piece by piece."""

from __future__ import annotations

import threading
import time

import pytest

from pixelray.generators import GenerationConfig, create_generator, resolve_generator, user_turn
from pixelray.generators.remote import RemoteOptions
from pixelray.hybrid import LLMServerError
from pixelray.testing.images import random_images
from pixelray.testing.llm_servers import FailingLLM


@pytest.fixture
def servers():
    made: list[FailingLLM] = []

    def make(mode: str, **kw) -> FailingLLM:
        made.append(FailingLLM(mode, **kw))
        return made[-1]
    yield make
    for s in made:
        s.shutdown()


def image_turns(n: int) -> tuple[list, list]:
    return [[user_turn("Describe the image.")] for _ in range(n)], [[im] for im in random_images(n)]


def test_settings_and_what_a_store_records():
    options = RemoteOptions.from_source("org/vlm?url=http://a:1/v1&url=http://b:2/v1&max_side=512&timeout=5")
    assert (options.model, options.urls, options.max_side, options.timeout) == (
        "org/vlm", ["http://a:1/v1", "http://b:2/v1"], 512, 5.0)
    assert RemoteOptions.from_source("?url=http://a:1/v1").model is None  # the first model the server lists
    spec = resolve_generator("remote:org/vlm?url=http://a:1/v1&max_side=512&max_in_flight=64&rest_s=1")
    assert spec.backend == "remote" and spec.identity == "remote:org/vlm?max_side=512"  # no servers, no timing
    for bad, message in (("m", "names no server"), ("m?url=http://a/v1&colour=red", "unknown setting 'colour'"),
                         ("m?url=ftp://a/v1", "http"), ("m?url=http://a/v1&max_side=1", "max_side")):
        with pytest.raises(ValueError, match=message):
            RemoteOptions.from_source(bad)


def test_requests_spread_and_a_failing_server_rests(servers):
    a, b = servers("ok"), servers("ok")
    gen = create_generator(f"remote:m?url={a.url}&url={b.url}&max_in_flight=4")
    results = gen.chat_items(*image_turns(8), GenerationConfig(max_new_tokens=4))
    assert all(r.text.startswith("caption ") for r in results) and a.requests > 0 and b.requests > 0
    assert a.requests + b.requests == 8

    down, up = servers("500"), servers("ok")
    gen = create_generator(f"remote:m?url={down.url}&url={up.url}&max_retries=0&max_in_flight=1&rest_s=60")
    results = gen.chat_items(*image_turns(6), GenerationConfig(max_new_tokens=4))
    assert all(r.text.startswith("caption ") for r in results)
    assert down.requests == 1 and up.requests == 6  # tried once, then rested: the rest went to the other

    gone = servers("500")
    gen = create_generator(f"remote:m?url={gone.url}&max_retries=0")
    [failure] = gen.chat_items(*image_turns(1), GenerationConfig())
    assert isinstance(failure, LLMServerError) and failure.transient and "HTTP 500" in str(failure)
    refusing = servers("no_choices")  # an answer that is no caption: lasting, no other server is tried
    gen = create_generator(f"remote:m?url={refusing.url}&url={up.url}&max_retries=0")
    before = up.requests
    outcomes = gen.chat_items(*image_turns(3), GenerationConfig())
    assert sum(isinstance(o, LLMServerError) and not o.transient for o in outcomes) >= 1
    assert up.requests - before + refusing.requests == 3


def test_a_streamed_reply_comes_piece_by_piece_and_stops_when_cancelled(servers):
    slow = servers("ok", delay=0.3)
    gen = create_generator(f"remote:m?url={slow.url}")
    started, arrivals = time.monotonic(), []
    conversation, [images] = [user_turn("Describe the image.")], image_turns(1)[1]
    for piece in gen.stream(conversation, images, GenerationConfig(max_new_tokens=4)):
        arrivals.append((time.monotonic() - started, piece))
    *pieces, result = [p for _, p in arrivals]
    assert pieces == ["caption", " 1"] and result.text == "caption 1" and result.num_tokens == 2
    assert arrivals[0][0] < slow.stream_ended - started - 0.5  # the first piece long before the stream ended

    cancel, received = threading.Event(), []
    stream = gen.stream(conversation, images, GenerationConfig(), cancel, received.append)
    assert next(stream) == "caption"
    cancel.set()
    assert list(stream) == [] and received == [1]  # closed at the next chunk, reported what it had
