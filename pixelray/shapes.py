"""The shapes demo dataset: synthetic images of one or two coloured shapes, with captions and Q/A.

    scene = random_scene(rng)                    # [Shape(colour="red", kind="circle", cell=(0, 0)), ...]
    image = render(scene, rng)                   # a 128x128 RGB PIL image
    caption(scene)                               # "a red circle at the top left and a blue square in the center"
    questions(scene, rng)                        # [("what colour is the circle?", "red"), ...]
    write_dataset("runs/shapes/train", 20000, seed=0)   # images/ + llava.json + captions/questions JSONL

Each image is a 3x3 grid of cells; each shape fills most of one cell, with a little jitter in size
and position. Captions name the shapes in reading order (top to bottom, left to right), so every
image has one correct caption. `caption_correct` checks a generated caption the way the demo's
accuracy figure counts: every shape's colour and kind named, and nothing else.

Run as:
    pixelray shapes --out runs/shapes/train --num 20000 --seed 0
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from pixelray.llava import llava_record

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
KINDS = ("circle", "square", "triangle", "star")
# row, column -> name; captions say "at the top left", "in the center", ...
CELLS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
         (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Write a short caption for this image.")
NUMBERS = {1: "one", 2: "two"}
# Held-out images come from a seed stream that training sets never use.
HELD_OUT_SEED = 10_000_019


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cell: tuple[int, int]

    @property
    def where(self) -> str:
        name = CELLS[self.cell]
        return {"center": "in the center", "left": "on the left", "right": "on the right"}.get(name, f"at the {name}")

    @property
    def named(self) -> str:
        """"a red circle", "an orange star"."""
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {self.kind}"


def random_scene(rng: random.Random) -> list[Shape]:
    """One or two shapes in distinct cells, in reading order."""
    cells = rng.sample(sorted(CELLS), rng.choice((1, 2)))
    return sorted((Shape(rng.choice(list(COLOURS)), rng.choice(KINDS), c) for c in cells), key=lambda s: s.cell)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    # a five-pointed star: outer and inner points alternating
    return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(math.pi / 2 + i * math.pi / 5),
             cy - (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi / 2 + i * math.pi / 5)) for i in range(10)]


def render(scene: list[Shape], rng: random.Random, size: int = 128) -> Image.Image:
    """Draw the scene on a light background of random tint."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for s in scene:
        r = cell * rng.uniform(0.36, 0.46)
        cx = (s.cell[1] + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
        cy = (s.cell[0] + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
        colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[s.colour])
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif s.kind == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
        else:
            draw.polygon(_polygon(s.kind, cx, cy, r * 1.1), fill=colour)
    return image


def caption(scene: list[Shape]) -> str:
    return " and ".join(f"{s.named} {s.where}" for s in scene)


def questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    """Questions with one short correct answer each: count, kind at a cell, colour of a kind, where,
    and a yes/no question that is true half of the time."""
    kinds = Counter(s.kind for s in scene)
    pairs = Counter((s.colour, s.kind) for s in scene)
    qa = [("How many shapes are there?", NUMBERS[len(scene)])]
    for s in scene:
        qa.append((f"What shape is {s.where}?", s.kind))
        if pairs[s.colour, s.kind] == 1:  # two red circles: "where is the red circle?" has no one answer
            qa.append((f"Where is the {s.colour} {s.kind}?", CELLS[s.cell]))
        if kinds[s.kind] == 1:
            qa.append((f"What colour is the {s.kind}?", s.colour))
    present = {(s.colour, s.kind) for s in scene}
    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(present))
    else:
        colour, kind = rng.choice([(c, k) for c in COLOURS for k in KINDS if (c, k) not in present])
    qa.append((f"Is there {Shape(colour, kind, (1, 1)).named}?", "yes" if (colour, kind) in present else "no"))
    return qa


_MENTION = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(KINDS)})s?\b")


def named_shapes(text: str) -> Counter:
    """The (colour, kind) pairs a caption names."""
    return Counter(_MENTION.findall(text.lower()))


def caption_correct(text: str, scene: list[Shape] | list[dict]) -> bool:
    """True when the caption names exactly the scene's shapes (colour and kind; positions not counted)."""
    truth = Counter((s["colour"], s["kind"]) if isinstance(s, dict) else (s.colour, s.kind) for s in scene)
    return named_shapes(text) == truth


def _example(index: int, seed: int) -> tuple[list[Shape], random.Random]:
    rng = random.Random(seed * 1_000_003 + index)
    return random_scene(rng), rng


def write_dataset(out: str | Path, num: int, seed: int = 0, size: int = 128, conversations_per_image: int = 4) -> Path:
    """Write `num` images and their annotations under `out`:

    - images/NNNNNN.png
    - llava.json: LLaVA conversation records ({"id", "image", "conversations"}), single-turn, a
      caption request or a question each; `conversations_per_image` records per image;
    - vqa.json: the same format, question-heavy (the demo recipe's last stage, which teaches what
      a caption does not): per image, its caption and every one of its questions, a record each;
    - captions.jsonl: {"image", "captions": [caption], "shapes": [...]} (references for `pixelray eval`);
    - questions.jsonl: {"image", "question", "answers": [answer]} (VQA input and references).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, vqa, caps, qas = [], [], [], []
    for i in range(num):
        scene, rng = _example(i, seed)
        name = f"images/{i:06d}.png"
        render(scene, rng, size).save(out / name, optimize=True)
        text = caption(scene)
        qa = questions(scene, rng)
        caps.append({"image": name, "captions": [text], "shapes": [asdict(s) for s in scene]})
        qas.extend({"image": name, "question": q, "answers": [a]} for q, a in qa)
        # Half of the records ask for the caption, the rest ask one of the image's questions.
        for j in range(conversations_per_image):
            q, a = (rng.choice(CAPTION_PROMPTS), text) if j % 2 == 0 else rng.choice(qa)
            records.append(llava_record(f"{i:06d}-{j}", name, q, a))
        for j, (q, a) in enumerate([(rng.choice(CAPTION_PROMPTS), text), *qa]):
            vqa.append(llava_record(f"{i:06d}-q{j}", name, q, a))
    (out / "llava.json").write_text(json.dumps(records))
    (out / "vqa.json").write_text(json.dumps(vqa))
    for fname, rows in (("captions.jsonl", caps), ("questions.jsonl", qas)):
        (out / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def corpus() -> list[str]:
    """Every word the dataset uses, in the sentences it uses them in (to train a tokenizer on)."""
    rng = random.Random(0)
    texts = ["user", "assistant", "system", *CAPTION_PROMPTS]
    for _ in range(2000):
        scene = random_scene(rng)
        texts.append(caption(scene))
        texts.extend(f"{q} {a}" for q, a in questions(scene, rng))
    return texts


def train_tokenizer(out: str | Path, vocab_size: int = 512):
    """A byte-level BPE tokenizer fitted to the shapes language (every word one or two tokens), with
    the Qwen2-style chat tokens and `<image>`; any other text still encodes, byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pixelray.generators.pixelray import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def descriptions(scene: list[Shape] | list[dict]) -> list[str]:
    """Every true text about a scene, longest first: its caption, the shapes without their places
    ("a red star and a blue circle"), and each shape on its own ("a red star"). A contrastive model
    trained on all of them answers short search queries as well as whole captions."""
    scene = [Shape(s["colour"], s["kind"], tuple(s["cell"])) if isinstance(s, dict) else s for s in scene]
    texts = [caption(scene)]
    if len(scene) > 1:
        texts.append(" and ".join(s.named for s in scene))
    texts.extend(dict.fromkeys(s.named for s in scene))
    return texts


def retrieval_queries() -> dict[tuple[str, str], str]:
    """(colour, kind) -> the search query naming it, "a red star", for all 24 pairs."""
    return {(c, k): Shape(c, k, (1, 1)).named for c in COLOURS for k in KINDS}


def retrieval_precision(encoder, num: int = 1000, k: int = 10, min_count: int = 10,
                        batch_size: int = 250) -> dict:
    """Text-to-image search quality of a CLIP-style encoder (`create_encoder(name, text=True)`) on
    `num` held-out images (rendered in memory from HELD_OUT_SEED): for each of the 24 queries "a red
    star", ..., the share of its k nearest images (cosine) that hold a red star. `mean` averages the
    queries whose pair is in at least `min_count` images (rarer ones cannot fill k hits reliably)."""
    import torch

    scenes, embeddings = [], []
    for start in range(0, num, batch_size):
        images = []
        for i in range(start, min(num, start + batch_size)):
            scene, rng = _example(i, HELD_OUT_SEED)
            scenes.append({(s.colour, s.kind) for s in scene})
            images.append(render(scene, rng))
        embeddings.append(encoder(images).embedding.float())
    image_emb = torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)
    queries = retrieval_queries()
    text_emb = torch.nn.functional.normalize(encoder.encode_text(list(queries.values())).float(), dim=-1)
    top = (text_emb @ image_emb.T).topk(k, dim=-1).indices.tolist()
    per_query, counts = {}, {}
    for (pair, text), hits in zip(queries.items(), top):
        per_query[text] = sum(pair in scenes[i] for i in hits) / k
        counts[text] = sum(pair in s for s in scenes)
    scored = [p for q, p in per_query.items() if counts[q] >= min_count]
    return {"mean": sum(scored) / max(1, len(scored)), "queries_scored": len(scored), "k": k, "images": num,
            "per_query": per_query, "counts": counts}
