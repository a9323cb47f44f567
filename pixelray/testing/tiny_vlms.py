"""Tiny random vision-language models built from configs, with a locally trained tokenizer.

Each builder writes a folder (model, generation config, processor, chat template) that loads
back with `AutoProcessor.from_pretrained(folder)` and
`AutoModelForImageTextToText.from_pretrained(folder)`. Nothing is downloaded.

How each family takes a batch (set `processor.tokenizer.padding_side = "left"` first; checked:
greedy `generate` on a left-padded batch of two gives the same tokens as each prompt alone):

- LLaVA: `processor.apply_chat_template(conv, add_generation_prompt=True)` per conversation
  (`USER: <image>\n... ASSISTANT:`; the tokenizer prepends `<s>`), then
  `processor(text=texts, images=imgs, padding=True, return_tensors="pt")`; images flat (one per
  `<image>`, in order) or a list of lists, both work. Pass everything to generate. eos `</s>`.
- Qwen2-VL: chat template as above; images flat or a list of lists. Keep `mm_token_type_ids` and
  `image_grid_thw` for generate: the 3D (mrope) positions are built from them (dropping
  `mm_token_type_ids` changes the logits). eos `<|im_end|>`; generation also stops on `<|endoftext|>`,
  the pad token. A 40x50 image becomes 8 patches of 14px -> 2 `<|image_pad|>` tokens.
- SmolVLM: chat template as above; images MUST be a list of lists, one inner list per prompt (a flat
  list is read as all images of ONE prompt and fails the image-count check). Returns
  `pixel_attention_mask`; pass everything to generate. eos `<end_of_utterance>`, pad `<|im_end|>`.
- PaliGemma: no chat template; text is `"<image>" + prompt` (a prompt without `<image>` also works:
  the processor then prepends it, with a warning). The processor expands `<image>` to 16 tokens,
  adds `<bos>` after them and `"\n"` at the end. Images flat or a list of lists. It also returns
  `labels` (all -100 without a `suffix`): drop it before generate (harmless, but only for training).
  Keep `token_type_ids`: they mark the bidirectional prefix (dropping them changes the logits).
  eos `<eos>`, pad `<pad>`.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "A photo of a cat sitting on a red chair next to the window.",
    "Describe the image in one short sentence, please.",
    "What color is the car? The car is blue and parked near a tree.",
    "USER: ASSISTANT: user assistant system You are a helpful assistant.",
    "Two dogs play in the park while the sun sets behind the hills.",
    "How many people are in this picture? There are three people.",
    "Question: what is shown here? Answer: a small house with a garden.",
]


def _train_tokenizer(special: list[str], vocab_size: int = 400, **kwargs):
    """A byte-level BPE trained on SENTENCES, with `special` as (unsplittable) special tokens.

    `kwargs` go to `PreTrainedTokenizerFast` (bos/eos/pad tokens, extra_special_tokens, ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def save_folder(model, processor, out: Path, eos_token_id, pad_token_id, bos_token_id=None) -> Path:
    """Write model, generation config and processor to `out`."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                               pad_token_id=pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


LLAVA_CHAT = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def save_tiny_llava(out: Path, width: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8) -> Path:
    """LLaVA-1.5 style: CLIP vision tower + Llama, `USER: <image>\\n... ASSISTANT:` prompts.
    Tiny by default; the caption benchmark asks for a wider, deeper one."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _train_tokenizer(["<pad>", "<s>", "</s>", "<image>"], bos_token="<s>", eos_token="</s>",
                           pad_token="<pad>", add_bos_token=True, extra_special_tokens={"image_token": "<image>"})
    heads = max(2, width // 64)
    vc = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, image_size=image_size, patch_size=patch)
    tc = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tok),
                     max_position_embeddings=1024,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tok.image_token_id,
                      vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor, tok, patch_size=patch, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=LLAVA_CHAT)
    return save_folder(model, proc, out, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)


QWEN_CHAT = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_qwen2_vl(out: Path, hidden: int = 32, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                       mlp: int | None = None, vision: tuple[int, int, int] = (32, 2, 2),
                       max_pixels: int = 56 * 56) -> Path:
    """Qwen2-VL style: 14px patches merged 2x2, mrope, `<|im_start|>` chat; a 40x50 image -> 2 tokens.
    Tiny by default: text heads of hidden/heads (vLLM's CPU attention needs 32, 64, 80, ...: hidden=128), an
    MLP of `mlp` (2 x hidden), vision (width, depth, heads); the caption benchmark asks for real sizes."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *vision_tokens],
                           eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *vision_tokens]}
    half_head = hidden // heads // 2  # mrope's sections (temporal, height, width) cover half of each head
    temporal = half_head // 4
    height = (half_head - temporal) // 2
    text = dict(hidden_size=hidden, intermediate_size=mlp or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                vocab_size=len(tok), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [temporal, height, half_head - temporal - height]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    width, depth, vision_heads = vision
    vision_config = dict(depth=depth, embed_dim=width, hidden_size=hidden, num_heads=vision_heads, mlp_ratio=2,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    pixels = dict(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_CHAT)
    return save_folder(model, proc, out, [tok.eos_token_id, ids["<|endoftext|>"]], tok.pad_token_id,
                       ids["<|endoftext|>"])


SMOLVLM_CHAT = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def save_tiny_smolvlm(out: Path, hidden: int = 32) -> Path:
    """SmolVLM style: one 32x32 tile (no splitting), pixel shuffle x2 -> 4 `<image>` tokens per image; a text
    model of two heads of hidden/2 (vLLM's CPU attention takes hidden=128)."""
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor, SmolVLMVisionConfig)

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
               "<end_of_utterance>", "<global-img>", *grid]
    tok = _train_tokenizer(special, vocab_size=450, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                           pad_token="<|im_end|>", unk_token="<|endoftext|>",
                           extra_special_tokens={"image_token": "<image>",
                                                 "fake_image_token": "<fake_token_around_image>",
                                                 "global_image_token": "<global-img>",
                                                 "end_of_utterance_token": "<end_of_utterance>"})
    image_size, patch, scale = 32, 8, 2
    vc = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=patch)
    tc = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = SmolVLMConfig(vision_config=vc, text_config=tc, scale_factor=scale,
                        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(cfg)
    sizes = dict(size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size})
    proc = SmolVLMProcessor(SmolVLMImageProcessor(do_image_splitting=False, **sizes), tok,
                            SmolVLMVideoProcessor(do_image_splitting=False, **sizes),
                            image_seq_len=(image_size // patch) ** 2 // scale**2, chat_template=SMOLVLM_CHAT)
    return save_folder(model, proc, out, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)


def save_tiny_paligemma(out: Path, hidden: int = 32) -> Path:
    """PaliGemma style: Siglip + Gemma, 16 `<image>` tokens, `<bos>` after them, the 1,152 <loc>/<seg> tokens;
    a text model of two heads of hidden/2 (vLLM's CPU attention takes hidden=128)."""
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    tok = _train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos_token="<bos>", eos_token="<eos>",
                           pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tok.add_tokens(["\n"])  # Gemma's vocabulary has a newline token; vLLM's PaliGemma looks it up
    image_size, patch = 32, 8
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                           image_seq_length=(image_size // patch) ** 2)
    proc = PaliGemmaProcessor(image_processor, tok)  # adds the <loc>/<seg> tokens to `tok`
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch)
    tc = GemmaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=hidden // 2, vocab_size=len(tok), max_position_embeddings=256,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_index=proc.image_token_id,
                          vocab_size=len(tok), projection_dim=hidden, hidden_size=hidden)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg)
    return save_folder(model, proc, out, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)


def save_tiny_pixelray(out: Path) -> Path:
    """The project's own model (pixelray.vlm): tiny open_clip ViT + projector + tiny Qwen2, Qwen chat."""
    from transformers import Qwen2Config

    from pixelray.generators.pixelray import CHAT_TEMPLATE
    from pixelray.testing.tiny_encoders import TINY_CLIP_CFG
    from pixelray.vlm import PixelRayConfig, PixelRayForConditionalGeneration

    tok = _train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = CHAT_TEMPLATE
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=512,
                       tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PixelRayConfig(vision_config=TINY_CLIP_CFG, vision_preprocess={"interpolation": "bicubic"},
                            text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    PixelRayForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save_tiny_text_llm(out: Path) -> Path:
    """A text-only chat LLM (tiny Qwen2ForCausalLM, Qwen chat template): a hybrid's LLM in tests."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pixelray.generators.pixelray import CHAT_TEMPLATE

    tok = _train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                           pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return save_folder(Qwen2ForCausalLM(config), tok, out, tok.eos_token_id, tok.pad_token_id)
