"""A tiny random Qwen2-VL folder that mlx-vlm loads (`mlx_vlm.load(dir)`, `python -m mlx_vlm.server
--model DIR`), built offline: a locally trained tokenizer, mlx-vlm's own model class for the weight
names and layout, and every processor file present so nothing is looked up on the hub.

Importing mlx_vlm replaces transformers' Qwen2-VL processor classes in that process (its own
return mlx arrays), so tests build and run MLX models in processes of their own: `save_in_subprocess`.

Qwen2-VL because mlx-vlm ships its own numpy image processor for it. (LLaVA in mlx-vlm 0.7.10 passes
`padding=True` to transformers' CLIP image processor, which now refuses it: images fail.) Images are
resized to 56x56: 16 patches of 14 px, merged 2x2 into 4 image tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pixelray.testing.tiny_vlms import _train_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# ChatML; an image part is one <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] in ['image', 'image_url', 'input_image'] %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] in ['text', 'input_text'] %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tiny_mlx_qwen2_vl(out: Path, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(SPECIAL, vocab_size=512, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    # pinned: by model_type alone, AutoTokenizer would rebuild it as a Qwen2Tokenizer
    (out / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "PreTrainedTokenizerFast"}))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    config = {
        "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"], "vocab_size": len(tok),
        # the text settings sit at the top level, as in Qwen2-VL's own config; mrope_section adds up to
        # head_dim / 2 = 64 / 4 / 2
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": 4096,
        "vision_config": {"model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                          "mlp_ratio": 2, "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3},
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"],
    }
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]}))
    image = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
             "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 56 * 56,
             "max_pixels": 56 * 56, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "do_convert_rgb": True, "image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276]}
    (out / "preprocessor_config.json").write_text(json.dumps(image))
    (out / "video_preprocessor_config.json").write_text(
        json.dumps({**image, "video_processor_type": "Qwen2VLVideoProcessor"}))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))

    # random weights in mlx-vlm's own names and layout (its load() sanitising leaves them as they are)
    mx.random.seed(seed)
    model_config = qwen2_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))  # from_dict changes its input
    model_config.text_config = qwen2_vl.TextConfig.from_dict(json.loads(json.dumps(config)))
    model_config.vision_config = qwen2_vl.VisionConfig.from_dict(config["vision_config"])
    weights = {k: v if "norm" in k or "ln_q" in k else (mx.random.normal(v.shape) * 0.02).astype(mx.float32)
               for k, v in tree_flatten(qwen2_vl.Model(model_config).parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


def save_in_subprocess(out: Path) -> Path:
    """`save_tiny_mlx_qwen2_vl` in a child process (keeps mlx_vlm out of the caller's)."""
    subprocess.run([sys.executable, "-m", __name__, str(out)], check=True, timeout=300)
    return out


@contextmanager
def mlx_vlm_server(model: Path, log: Path, port: int) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m mlx_vlm.server` serving `model` on 127.0.0.1:`port` (its output in `log`), in a session of its
    own; yields the process and its /v1 URL once it answers, and stops it (if a test has not killed it)."""
    from pixelray.hybrid import LMStudioConfig, check_lm_studio_available

    url = f"http://127.0.0.1:{port}/v1"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_vlm.server", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", str(model)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not check_lm_studio_available(LMStudioConfig(base_url=url), timeout=2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlx_vlm.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    save_tiny_mlx_qwen2_vl(Path(sys.argv[1]))
