"""Bounded conversation state for `/chat`: an LRU of conversations, each forgotten after `ttl_s`
idle and each at most `max_turns` user turns long, whose images together hold at most
`max_image_bytes` (past it, the least recently used conversations are forgotten first). The route
keeps each image only as large as its model uses it (ImageFit).

    store = ConversationStore(max_conversations=1024, max_turns=16, ttl_s=3600, max_image_bytes=256 << 20)
    cid, convo = store.open(None)          # a new conversation (or the one an id names)
    convo.messages / convo.images          # the chat so far, in the generators' chat format
    store.commit(cid, convo, user_message, image, reply)

State lives in the ingress replica's memory: run one ingress replica for /chat (the default), or
clients lose their conversation when a request lands on another replica.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from pixelray.errors import PixelrayError
from pixelray.generators import Message


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    busy: bool = False  # a reply is being generated
    last_used: float = 0.0

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")

    @property
    def image_bytes(self) -> int:
        return sum(image_bytes(im) for im in self.images)


def image_bytes(image: Image.Image) -> int:
    """What a decoded image holds in memory."""
    return image.width * image.height * len(image.getbands())


class ConversationStore:
    def __init__(self, max_conversations: int = 1024, max_turns: int = 16, ttl_s: float = 3600.0,
                 max_image_bytes: int = 256 << 20, clock: Callable[[], float] = time.monotonic):
        self.max_conversations, self.max_turns, self.ttl_s, self.clock = max_conversations, max_turns, ttl_s, clock
        self.max_image_bytes = max_image_bytes
        self._items: OrderedDict[str, Conversation] = OrderedDict()

    @property
    def image_bytes(self) -> int:
        """The memory the kept conversations' images hold."""
        return sum(convo.image_bytes for convo in self._items.values())

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def _expire(self) -> None:
        now = self.clock()
        for cid in [c for c, convo in self._items.items() if now - convo.last_used > self.ttl_s and not convo.busy]:
            del self._items[cid]

    def open(self, cid: str | None) -> tuple[str, Conversation]:
        """The conversation `cid` names, marked busy (404 unknown or expired, 409 busy or full),
        or a new one when `cid` is None."""
        self._expire()
        if cid is None:
            cid, convo = uuid.uuid4().hex, Conversation()
        elif (convo := self._items.get(cid)) is None:
            raise PixelrayError(f"unknown or expired conversation_id {cid!r}: omit it to start a new one", 404,
                                "conversation")
        elif convo.busy:
            raise PixelrayError(f"conversation {cid} is still generating its previous reply", 409, "conversation")
        elif convo.turns >= self.max_turns:
            raise PixelrayError(f"conversation {cid} reached its limit of {self.max_turns} turns: start a new one",
                                409, "conversation")
        convo.busy = True
        return cid, convo

    def release(self, convo: Conversation) -> None:
        """Give a conversation back without a new turn (its request failed)."""
        convo.busy = False

    def commit(self, cid: str, convo: Conversation, user: Message, image: Image.Image | None, reply: str) -> None:
        """Record a finished turn, and keep the conversation (evicting the least recently used)."""
        convo.messages += [user, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        if image is not None:
            convo.images.append(image)
        convo.busy, convo.last_used = False, self.clock()
        self._items[cid] = convo
        self._items.move_to_end(cid)
        while len(self._items) > self.max_conversations:
            self._items.popitem(last=False)
        total = self.image_bytes
        for old in [c for c, other in self._items.items() if c != cid and not other.busy]:  # oldest first
            if total <= self.max_image_bytes:
                break
            total -= self._items.pop(old).image_bytes
