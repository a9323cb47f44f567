"""The LLaVA record format: what `pixelray train` reads (train_jobs/data.py), and what `pixelray shapes` and
`pixelray records` write.

    {"id": ..., "image": "images/000001.png", "conversations": [
        {"from": "human", "value": "<image>\\nDescribe the image."}, {"from": "gpt", "value": "a red star"}]}

A record of several images lists them (`"image": ["a.png", "b.png"]`), each placed by its tag in the turns.
"""

from __future__ import annotations

IMAGE_TAG = "<image>"  # where the image goes in a human turn


def llava_record(rid: str, image: str, prompt: str, reply: str) -> dict:
    """A single-turn record: the image, then the prompt (or question), and the reply."""
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": f"{IMAGE_TAG}\n{prompt}"}, {"from": "gpt", "value": reply}]}
