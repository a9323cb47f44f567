"""What differs between the vision-language families transformers serves, in one table that inference
(the hf backend) and training (the collators) both read.

    family("smolvlm").nested_images    # True: its processor takes one image list per prompt
    family("paligemma").chat_template  # False: the prompt is the image tokens, then the plain text
    chat_prompts(processor, family(model_type), conversations)   # the prompt text of each conversation
"""

from __future__ import annotations

from dataclasses import dataclass

from pixelray.generators.base import Message, count_images


@dataclass(frozen=True)
class Family:
    # the processor wants one image list per prompt; a flat list is read as all the images of one prompt
    nested_images: bool = False
    # False: no chat template; the prompt is the image tokens followed by the user's text (PaliGemma)
    chat_template: bool = True


FAMILIES: dict[str, Family] = {  # by config.model_type; the others (LLaVA, LLaVA-NeXT, Qwen2-VL, ...) take the defaults
    "idefics2": Family(nested_images=True),
    "idefics3": Family(nested_images=True),
    "smolvlm": Family(nested_images=True),
    "paligemma": Family(chat_template=False),
}


def family(model_type: str) -> Family:
    return FAMILIES.get(model_type, Family())


def chat_prompts(processor, family: Family, conversations: list[list[Message]], image_tokens: bool = True) -> list[str]:
    """Each conversation's prompt, as the model's processor builds it: its chat template with the
    assistant's turn opened, or for a family without one, its image tokens (unless the engine puts them
    in itself, as vLLM does: `image_tokens=False`) then the last user text."""
    if family.chat_template:
        return [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    image_token = getattr(processor, "image_token", "<image>") if image_tokens else ""
    return [image_token * count_images(c) + _last_user_text(c) for c in conversations]


def _last_user_text(conversation: list[Message]) -> str:
    for message in reversed(conversation):
        if message["role"] == "user":
            return " ".join(c["text"] for c in message["content"] if c.get("type") == "text")
    raise ValueError("a conversation needs at least one user message")
