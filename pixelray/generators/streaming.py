"""Token streaming for one reply: text pieces as `generate()` produces them, then the final result.

    for piece in stream_reply(generator, conversation, images, GenerationConfig(max_new_tokens=32)):
        if isinstance(piece, str):
            print(piece, end="")          # a new piece of text
        else:
            result = piece                # the GenerationResult, last

The pieces add up to the final result's text. Text that could be the start of a stop string is held
back until it is clear, so a stop string is never sent and then taken back.

A reader that goes away (a client that disconnects) sets `cancel`, or closes the iterator: the
generation stops at its next token instead of running on to `max_new_tokens`.

A model behind a server (the hybrid, the remote backend) streams its server's reply through
`stream_completion` instead: the same pieces, as the server's chunks arrive.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

from PIL import Image
from transformers.generation.streamers import BaseStreamer

from pixelray.generators.base import GenerationConfig, GenerationResult, Generator, Message, cut_at_stop, reply_text
from pixelray.hybrid.client import Completion

_END = object()


class Cancelled(Exception):
    """Raised in the generating thread at the first token after its reader went away."""


class TokenQueue(BaseStreamer):
    """A streamer for one sequence: `generate()` puts the prompt first (skipped), then each new token;
    once `cancel` is set, the next put raises Cancelled, which ends `generate()`."""

    def __init__(self, cancel: threading.Event):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False
        self.cancel = cancel
        self.generated = 0  # tokens put so far

    def put(self, value) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"the reader went away after {self.generated} tokens")
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.generated += len(ids)
        self.queue.put(ids)

    def end(self) -> None:
        self.queue.put(_END)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self.queue.get()) is not _END:
            yield ids


class FirstToken(BaseStreamer):
    """A streamer that notes when `generate()` makes its first token (`at`, perf_counter seconds); in a batch
    every row's first token comes in the same step."""

    def __init__(self):
        self.at: float | None = None
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def stream_reply(generator: Generator, conversation: list[Message], images: list[Image.Image],
                 config: GenerationConfig = GenerationConfig(),
                 cancel: threading.Event | None = None,
                 on_cancelled: Callable[[int], None] | None = None) -> Iterator[str | GenerationResult]:
    """Generate one reply in a background thread, yielding text pieces, then the GenerationResult.
    Setting `cancel` (or closing this iterator) stops the generation at its next token; then
    `on_cancelled` is called (in the generating thread) with the number of tokens generated."""
    cancel = cancel or threading.Event()
    tokens, outcome = TokenQueue(cancel), {}

    def run() -> None:
        try:
            outcome["result"] = generator.chat_batch([conversation], [images], config, streamer=tokens)[0]
        except Cancelled:
            if on_cancelled is not None:
                on_cancelled(tokens.generated)
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e
        finally:
            tokens.end()  # generate() already did, unless it failed first

    thread = threading.Thread(target=run, daemon=True, name="stream-reply")
    thread.start()
    hold = max((len(s) for s in config.stop), default=1) - 1
    ids: list[int] = []
    sent = ""
    try:
        for new in tokens:
            ids.extend(new)
            text, stopped = cut_at_stop(generator.tokenizer.decode(ids, skip_special_tokens=True).lstrip(),
                                        config.stop)
            ready = reply_text(text if stopped else text[: len(text) - hold])  # what may not end the reply waits
            if len(ready) > len(sent) and ready.startswith(sent):
                yield ready[len(sent):]
                sent = ready
        thread.join()  # generate() ends the stream before chat() has returned the result
    finally:
        if thread.is_alive():  # closed before the end: stop generating
            cancel.set()
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:  # cancelled
        return
    result: GenerationResult = outcome["result"]
    if result.text.startswith(sent) and len(result.text) > len(sent):
        yield result.text[len(sent):]
    yield result


def settings_of(config: GenerationConfig) -> dict:
    """GenerationConfig -> the keyword arguments of LMStudioClient.complete and .stream (OpenAI's fields)."""
    return dict(max_tokens=config.max_new_tokens, temperature=config.temperature,
                top_p=config.top_p if config.top_p < 1 else None, seed=config.seed, stop=config.stop or None)


def completion_result(completion: Completion) -> GenerationResult:
    """A server's chat completion as a GenerationResult."""
    return GenerationResult(text=completion.text, num_tokens=completion.completion_tokens,
                            prompt_tokens=completion.prompt_tokens,
                            finish_reason="length" if completion.finish_reason == "length" else "stop")


def stream_completion(deltas: Iterator[str | Completion], cancel: threading.Event | None = None,
                      on_cancelled: Callable[[int], None] | None = None) -> Iterator[str | GenerationResult]:
    """A server's streamed reply (LMStudioClient.stream: text deltas, then the Completion) -> text pieces as
    they arrive, then the GenerationResult; the pieces add up to its text (leading and trailing whitespace
    is held back, as `reply_text` drops it). Once `cancel` is set, the next delta closes the stream (the
    connection: the server stops) and `on_cancelled` is called with the deltas received."""
    text, sent, received = "", "", 0
    try:
        for delta in deltas:
            if isinstance(delta, Completion):
                result = completion_result(delta)
                if result.text.startswith(sent) and len(result.text) > len(sent):
                    yield result.text[len(sent):]
                yield result
                return
            if cancel is not None and cancel.is_set():
                if on_cancelled is not None:
                    on_cancelled(received)
                return
            text, received = text + delta, received + 1
            ready = reply_text(text)
            if len(ready) > len(sent) and ready.startswith(sent):
                yield ready[len(sent):]
                sent = ready
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
