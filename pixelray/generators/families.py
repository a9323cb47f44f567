"""What differs between the vision-language families transformers serves, in one table that inference
(the hf backend) and training (the collators) both read.

    family("smolvlm").nested_images    # True: its processor takes one image list per prompt
    family("paligemma").chat_template  # False: the prompt is the image tokens, then the plain text
    chat_prompts(processor, family(model_type), conversations)   # the prompt text of each conversation
    processor_fit(processor.image_processor)                     # how far an image may be scaled down
"""

from __future__ import annotations

from dataclasses import dataclass

from pixelray.generators.base import Message, count_images, literal_text
from pixelray.images import ImageFit


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
    in itself, as vLLM does: `image_tokens=False`) then the last user text. Special tokens typed into
    the text stay text (see `literal_text`)."""
    conversations = literal_text(conversations, getattr(processor, "tokenizer", processor))
    if family.chat_template:
        return [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    image_token = getattr(processor, "image_token", "<image>") if image_tokens else ""
    return [image_token * count_images(c) + _last_user_text(c) for c in conversations]


def _last_user_text(conversation: list[Message]) -> str:
    for message in reversed(conversation):
        if message["role"] == "user":
            return " ".join(c["text"] for c in message["content"] if c.get("type") == "text")
    raise ValueError("a conversation needs at least one user message")


def processor_fit(image_processor) -> ImageFit | None:
    """What a transformers image processor keeps of an image, read from its settings: Qwen2-VL's pixel
    budget (with room for its rounding), LLaVA-NeXT's largest tile grid, CLIP's shortest edge, Idefics3's longest edge, SigLIP's fixed
    square (scaling the shorter side down to its larger edge loses nothing); None for anything else."""
    size = getattr(image_processor, "size", None) or {}

    def edge(key: str) -> int | None:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if value else None

    if hasattr(image_processor, "temporal_patch_size"):  # the Qwen-VL processors: sizes are pixel counts
        budget = edge("longest_edge") or edge("max_pixels")
        # twice the budget: an image still over it after rounding to patch multiples gets the same grid
        return ImageFit(pixels=2 * budget) if budget else None
    if pinpoints := getattr(image_processor, "image_grid_pinpoints", None):
        return ImageFit(long_side=max(max(p) for p in pinpoints))
    if shortest := edge("shortest_edge"):
        return ImageFit(short_side=shortest)
    if longest := edge("longest_edge"):
        return ImageFit(long_side=longest)
    if edge("height") and edge("width"):
        return ImageFit(short_side=max(edge("height"), edge("width")))
    return None
