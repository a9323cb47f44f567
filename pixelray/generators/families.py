"""What differs between the vision-language families transformers serves, in one table that inference
(the hf backend) and training (the collators) both read.

    family("smolvlm").nested_images    # True: its processor takes one image list per prompt
    family("paligemma").chat_template  # False: the prompt is the image tokens, then the plain text
"""

from __future__ import annotations

from dataclasses import dataclass


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
