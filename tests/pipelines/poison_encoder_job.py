"""The driver of test_crashes.py, in a process of its own: it joins the test session's Ray cluster with a
worker setup hook (Ray's `worker_process_setup_hook`) that registers a test-only encoder architecture
with transformers, `poison-vit`: a ViT whose forward ends its own process at once (os._exit, as a
segfault or the kernel's OOM killer would: no exception, no cleanup) when an image is all magenta. It
saves such an encoder, runs real `pixelray embed` jobs with it, over INPUT into OUT for each pair given,
and prints each one's summary (or its PixelrayError) as a line of JSON.

Run as: python tests/pipelines/poison_encoder_job.py RAY_ADDRESS MODEL_DIR INPUT OUT [INPUT OUT ...]
"""

from __future__ import annotations

import json
import os
import sys
import time

from transformers import AutoConfig, AutoModel, ViTConfig, ViTImageProcessor, ViTModel


class PoisonViTConfig(ViTConfig):
    model_type = "poison-vit"


class PoisonViTModel(ViTModel):
    config_class = PoisonViTConfig

    def forward(self, pixel_values=None, **kwargs):
        # magenta (255, 0, 255) after the processor's normalisation to [-1, 1]
        magenta = (pixel_values[:, 0] > 0.99) & (pixel_values[:, 1] < -0.99) & (pixel_values[:, 2] > 0.99)
        if bool(magenta.flatten(1).all(1).any()):
            os._exit(1)
        return super().forward(pixel_values=pixel_values, **kwargs)


def register() -> None:
    AutoConfig.register(PoisonViTConfig.model_type, PoisonViTConfig, exist_ok=True)
    AutoModel.register(PoisonViTConfig, PoisonViTModel, exist_ok=True)


if __name__ == "__main__":
    import ray

    address, model_dir, *jobs = sys.argv[1:]
    register()
    config = PoisonViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)
    PoisonViTModel(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    # (defined in __main__, the hook and its classes travel to the workers by value)
    ray.init(address=address, runtime_env={"worker_process_setup_hook": register}, log_to_driver=False)

    from pixelray.errors import PixelrayError
    from pixelray.pipelines.embed import EmbedConfig, run_embed

    for images, out in zip(jobs[::2], jobs[1::2]):
        began = time.monotonic()
        try:
            result = run_embed(EmbedConfig(input=images, out=out, encoder=model_dir, batch_size=2, max_task_retries=1,
                                           num_encoders=1, device="cpu"))
            summary = {"written": result.written, "errors": result.errors}
        except PixelrayError as e:
            summary = {"error": e.message, "code": e.code}
        print(json.dumps({**summary, "seconds": round(time.monotonic() - began, 1)}), flush=True)
