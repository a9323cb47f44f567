"""Models for training: load or build, freeze per stage, LoRA, and export.

    model, processing = load_model(cfg.model)                    # pixelray or hf family
    model = apply_stage(model, stage)                           # requires_grad per part, peft LoRA
    print(parameter_table(model))                               # trainable vs total, per part
    loss = reply_mean_loss(logits, labels)                      # each reply weighs the same
    export_model(state_dict, cfg.model, stage, processing, out) # a folder `pixelray caption --model` loads

Every VLM here has three parts, named by its modules: the vision tower, the projector (connector)
and the language model; `part_of` maps a parameter name to its part for all supported families.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pixelray.train_jobs.config import ModelConfig, Part, StageConfig

if TYPE_CHECKING:
    from pixelray.vlm import PixelRayConfig

# First match wins: Qwen2-VL's projector (merger) lives inside its vision tower.
_PARTS: list[tuple[Part, re.Pattern]] = [
    ("projector", re.compile(r"(^|\.)(multi_modal_projector|connector|projector|visual\.merger)\.")),
    ("vision", re.compile(r"(^|\.)(vision_tower|vision_model|visual|vision)\.")),
    ("language_model", re.compile(r"(^|\.)(language_model|text_model|lm_head)(\.|$)")),
]


def _match(name: str) -> tuple[Part, re.Match]:
    for part, pattern in _PARTS:
        if found := pattern.search(name):
            return part, found
    raise ValueError(f"parameter {name!r} belongs to no known part (vision, projector, language_model)")


def part_of(name: str) -> Part:
    return _match(name)[0]


def _module_of(name: str) -> str:
    """The name of the part's module ("projector", "multi_modal_projector", "merger", ...)."""
    return _match(name)[1].group(2).split(".")[-1]


def load_model(cfg: ModelConfig, source: str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device = torch.device("cpu")) -> tuple[nn.Module, Any]:
    """(model, tokenizer or processor) from `source` (a saved folder or hub id; default `cfg.path`),
    or a new pixelray model built from `cfg.vision` + `cfg.text` when neither is given."""
    source = source or cfg.path
    if cfg.family == "hf":
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.quantization:
            from pixelray.generators.hf import quantization_kwargs

            kwargs.update(quantization_kwargs(cfg.quantization, device))
        return AutoModelForImageTextToText.from_pretrained(source, **kwargs), AutoProcessor.from_pretrained(source)
    from transformers import AutoTokenizer

    from pixelray.vlm import PixelRayForConditionalGeneration

    if source:
        return (PixelRayForConditionalGeneration.from_pretrained(source, dtype=dtype),
                AutoTokenizer.from_pretrained(source))
    return build_pixelray(cfg)


def pixelray_config(cfg: ModelConfig, source: str | None = None):
    """(PixelRayConfig, tokenizer) of the model `load_model` would give, without loading weights."""
    import open_clip
    from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer

    from pixelray.generators.pixelray import CHAT_TEMPLATE
    from pixelray.vlm import IMAGE_TOKEN, PixelRayConfig

    source = source or cfg.path
    if source:
        return AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    tokenizer_source = cfg.tokenizer or (cfg.text if isinstance(cfg.text, str) else None)
    if tokenizer_source is None:
        raise ValueError("model.tokenizer is required when model.text is a config dict")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if isinstance(cfg.text, str):
        text_config = AutoConfig.from_pretrained(cfg.text)
        text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    else:  # a new LM: its vocabulary is the tokenizer's unless the config says otherwise
        text_config = CONFIG_MAPPING[cfg.text.get("model_type", "qwen2")](**{"vocab_size": len(tokenizer), **cfg.text})
    text_config.eos_token_id, text_config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    vision = cfg.vision if isinstance(cfg.vision, dict) else open_clip.get_model_config(cfg.vision)
    if vision is None:
        raise ValueError(f"unknown open_clip model {cfg.vision!r}: see open_clip.list_models()")
    config = PixelRayConfig(vision_config=vision, vision_preprocess=cfg.vision_preprocess, text_config=text_config,
                            vision_stem=cfg.vision_stem, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config, tokenizer


def build_pixelray(cfg: ModelConfig):
    """A new pixelray model: open_clip vision tower (pretrained when a tag is given), a fresh projector,
    and a causal LM (pretrained from a hub id or folder, or random from a config dict)."""
    from transformers import AutoModelForCausalLM

    from pixelray.vlm import PixelRayForConditionalGeneration

    config, tokenizer = pixelray_config(cfg)
    model = PixelRayForConditionalGeneration(config)  # (its vision tower is built first: see initial_vision_tower)
    if cfg.vision_pretrained:
        _load_pretrained_tower(model.vision, cfg)
    if isinstance(cfg.text, str):
        lm = AutoModelForCausalLM.from_pretrained(cfg.text)
        lm.resize_token_embeddings(len(tokenizer))
        model.language_model = lm
    generation = model.language_model.generation_config
    generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return model, tokenizer


def _load_pretrained_tower(tower: nn.Module, cfg: ModelConfig) -> None:
    import open_clip

    tower.load_state_dict(open_clip.create_model(cfg.vision, pretrained=cfg.vision_pretrained).visual.state_dict())


def initial_vision_tower(cfg: ModelConfig, source: str | None, seed: int,
                         config: PixelRayConfig | None = None) -> nn.Module:
    """The vision tower of the model `load_model(cfg, source)` gives after `torch.manual_seed(seed)` (pixelray
    family), without the rest: read from the source folder, or built as `build_pixelray` builds it first (from
    `config`, that model's `pixelray_config`, when the caller has it)."""
    from pixelray.encoders import create_encoder
    from pixelray.vlm import vision_tower

    source = source or cfg.path
    if source:
        return create_encoder(source, device="cpu").visual
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = vision_tower(config or pixelray_config(cfg)[0])
    if cfg.vision_pretrained:
        _load_pretrained_tower(tower, cfg)
    return tower


def check_stored_features(manifest: dict[str, Any], cfg: ModelConfig, source: str | None, seed: int) -> None:
    """A feature store may stand in for the vision tower only when it holds that tower's patch tokens: written by
    `pixelray embed --patches` without normalisation, with the model's preprocessing and the very weights of the
    tower the stage starts from (compared tensor by tensor, BatchNorm statistics included). ValueError if not."""
    from pixelray.encoders import create_encoder, open_clip_preprocess_cfg
    from pixelray.vector_index import store_encoder_spec

    name, spec = store_encoder_spec(manifest)
    wrong = [] if manifest.get("patches") else ["it holds no patch features (embed with --patches)"]
    if manifest.get("normalize"):
        wrong.append("its features are L2-normalised (embed without --normalize)")
    if spec.backend not in ("open_clip", "pixelray"):
        wrong.append(f"its encoder {name!r} is a transformers model, not the open_clip tower of a pixelray model")
    if not wrong:
        config, _ = pixelray_config(cfg, source)
        expected = open_clip_preprocess_cfg(config.vision_config, config.vision_preprocess)
        if spec.preprocess != expected:
            wrong.append(f"its encoder {name!r} preprocesses images as {spec.preprocess}, the model as {expected}")
    if not wrong:
        ours = initial_vision_tower(cfg, source, seed, config).state_dict()
        theirs = create_encoder(spec, device="cpu").visual.state_dict()
        if differ := [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]:
            wrong.append(f"its encoder {name!r} ({manifest.get('encoder_source')}, pretrained "
                         f"{manifest.get('pretrained')}) is not the tower this stage starts from: "
                         f"{len(differ)} of {len(ours)} tensors differ ({', '.join(differ[:3])}, ...)")
    if wrong:
        raise ValueError("the feature store cannot stand in for the model's vision tower: " + "; ".join(wrong))


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except that a module none of whose parameters trains stays in eval mode: a frozen vision
    tower keeps its BatchNorm statistics and computes what inference (and a feature store) computes."""
    model.train()
    for module in model.modules():
        params = [p.requires_grad for p in module.parameters()]
        if params and not any(params):
            module.eval()
    return model


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one per learning rate (`stage.lr`, or the
    part's `stage.part_lr`), e.g. an unfrozen pretrained vision tower at a lower rate than the rest."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(stage.part_lr.get(part_of(name), stage.lr), []).append(param)
    return [{"params": params, "lr": lr} for lr, params in groups.items()]


def apply_stage(model: nn.Module, stage: StageConfig) -> nn.Module:
    """Freeze every part the stage does not train; with `stage.lora`, wrap the model in peft LoRA
    adapters on the language model (the parts in `stage.train` stay fully trainable)."""
    for name, param in model.named_parameters():
        param.requires_grad = part_of(name) in stage.train
    if stage.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    # modules_to_save keeps the other trained parts (e.g. the projector) trainable, saved with the adapter
    keep = sorted({_module_of(n) for n, p in model.named_parameters() if p.requires_grad})
    lora = LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                      target_modules=stage.lora.target_modules, modules_to_save=keep or None)
    return get_peft_model(model, lora)


def parameter_table(model: nn.Module, title: str = "") -> str:
    """Trainable vs total parameters per part, as a text table."""
    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        part = "lora" if "lora_" in name else part_of(name)
        row = counts.setdefault(part, [0, 0])
        row[0] += p.numel() if p.requires_grad else 0
        row[1] += p.numel()
    lines = [f"{title}", f"{'part':<16}{'trainable':>14}{'total':>14}"]
    for part, (trainable, total) in sorted(counts.items()):
        lines.append(f"{part:<16}{trainable:>14,}{total:>14,}")
    trainable, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    lines.append(f"{'all':<16}{trainable:>14,}{total:>14,}  ({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(lines)


def reply_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged within each reply (a run of labelled tokens), then over
    the batch's replies, so that every reply counts the same, however long."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tokens = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    labelled = labels != -100
    starts = labelled & ~nn.functional.pad(labelled[:, :-1], (1, 0), value=False)
    reply = (starts.flatten().cumsum(0) - 1).view_as(labels)[labelled]  # each labelled token's reply
    replies = int(starts.sum())
    sums = tokens.new_zeros(replies).index_add_(0, reply, tokens[labelled])
    counts = tokens.new_zeros(replies).index_add_(0, reply, torch.ones_like(tokens[labelled]))
    return (sums / counts).mean()


def to_device(inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A collated batch on the device, its floating-point tensors (the pixels) in the model's dtype."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def stage_loss(model, inputs: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The stage's loss (StageConfig.loss): the mean over every reply token, or each reply's mean, then their mean."""
    if kind == "reply":
        labels = inputs.pop("labels")
        return reply_mean_loss(model(**inputs).logits, labels)
    return model(**inputs).loss


def export_model(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str | None, stage: StageConfig,
                 processing: Any, out: Path) -> Path:
    """Write the trained model (`state`, the full state dict of the trained module) as a folder that
    loads with from_pretrained: LoRA adapters go to `out/adapter` and are merged into `out/model`."""
    model, _ = load_model(cfg, source)
    model = apply_stage(model, stage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"exported state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if stage.lora is not None:
        model.save_pretrained(out / "adapter")
        if cfg.quantization:  # a quantized base cannot take merged weights: the adapter is the result
            return out / "adapter"
        model = model.merge_and_unload()
    model.save_pretrained(out / "model")
    processing.save_pretrained(out / "model")
    return out / "model"
