"""Typed training configs, read from YAML with `key=value` overrides from the command line.

    cfg = load_config("train_jobs/configs/shapes.yaml", ["stages.1.lr=3e-4", "scaling.num_workers=2"])

Overrides are OmegaConf's dotlist: dotted paths, a number indexing a list (`stages.0.max_steps=10`),
values parsed as YAML (`true`, `1e-4`, `[a, b]`). Unknown keys are errors, here and in the YAML file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from pixelray.device import QuantizationName

Part = Literal["vision", "projector", "language_model"]
DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    """What to train. `family` pixelray: the project's own model (pixelray.vlm), either loaded from
    `path` or built from parts: `vision` (an open_clip model name such as "ViT-B-32" or a model config
    dict) with optional `vision_pretrained` tag, `text` (a causal LM hub id or folder, or a config dict
    to start from random weights) and `tokenizer` (hub id or folder; default: `text` when it is one).
    `family` hf: an off-the-shelf VLM (LLaVA, SmolVLM, Qwen2-VL, PaliGemma) loaded from `path`."""

    family: Literal["pixelray", "hf"] = "pixelray"
    path: str | None = None
    vision: str | dict[str, Any] | None = None
    vision_pretrained: str | None = None
    vision_preprocess: dict[str, Any] = Field(default_factory=dict)
    vision_stem: list[int] | None = None  # a ConvStem's channels in place of the patch embedding (from scratch)
    text: str | dict[str, Any] | None = None
    tokenizer: str | None = None
    quantization: QuantizationName | None = None  # hf family only; needs CUDA (bitsandbytes)
    # recompute each layer's activations in the backward pass instead of keeping them: less memory, more compute
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.family == "hf" and not self.path:
            raise ValueError("model.path is required for the hf family (a hub id or a model folder)")
        if self.family == "pixelray" and not self.path and (self.vision is None or self.text is None):
            raise ValueError("a pixelray model needs model.path, or model.vision and model.text to build one")
        if self.vision_stem and self.vision_pretrained:
            raise ValueError("model.vision_stem replaces the patch embedding, so it cannot load "
                             "model.vision_pretrained weights: use it for towers trained from scratch")
        if self.quantization and self.family != "hf":
            raise ValueError("model.quantization applies to the hf family only")
        return self


class DataConfig(Strict):
    """Training records: LLaVA conversations ({"id", "image", "conversations": [{"from", "value"}]}, `image` a
    path or a list of them, each placed by an <image> tag) or the simple format ({"image", "text", "prompt"}),
    as JSON, JSON lines or Parquet files or folders."""

    train: str | list[str]
    format: Literal["auto", "llava", "simple"] = "auto"
    image_root: str | None = None  # relative image paths are resolved here (default: the data file's folder)
    max_length: int = Field(512, ge=8)
    shuffle_buffer: int = Field(1000, ge=0)  # rows; 0 keeps the file order
    # a `pixelray dedup` table (Parquet): records of the images it does not keep are left out
    exclude: str | None = None
    # pixelray family: a batch's records packed into rows of up to max_length tokens, each attending only to itself
    packing: bool = False


class LoraSettings(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # the attention projections of the language model (named language_model or text_model in every family)
    target_modules: str | list[str] = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)"


class StageConfig(Strict):
    """One stage: which parts train (the rest is frozen), LoRA or full, and the schedule."""

    name: str
    train: list[Part]
    data: str | list[str] | None = None  # this stage's records (default: data.train), e.g. pretrain vs instruct
    # a feature store (`pixelray embed --patches --encoder MODEL_OR_TOWER`) holding the frozen vision tower's patch
    # tokens for the records' images: read instead of running the tower (checked to be this model's tower)
    features: str | None = None
    lora: LoraSettings | None = None  # LoRA adapters on the language model instead of training it whole
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    batch_size: int = Field(8, ge=1)  # per worker, per micro-step
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    part_lr: dict[Part, PositiveFloat] = {}  # a part's own peak rate, e.g. {vision: 2.0e-6} for an unfrozen CLIP
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    # token: the mean over every reply token in the batch (long captions outweigh one-word answers);
    # reply: each reply's mean first, then the mean over replies (a "yes" weighs as much as a caption)
    loss: Literal["token", "reply"] = "token"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    eval_every: int | None = Field(None, ge=1)  # steps between validations (default: checkpoint_every)

    @model_validator(mode="after")
    def _parts(self) -> StageConfig:
        if not self.train:
            raise ValueError(f"stage {self.name}: `train` names no part (vision, projector, language_model)")
        if self.lora and "language_model" in self.train:
            raise ValueError(f"stage {self.name}: LoRA adapts the language model; drop language_model from "
                             "`train` (full fine-tuning) or drop `lora`")
        if frozen := sorted(set(self.part_lr) - set(self.train)):
            raise ValueError(f"stage {self.name}: part_lr names {frozen}, which this stage does not train")
        if self.features and "vision" in self.train:
            raise ValueError(f"stage {self.name}: stored features stand in for a frozen vision tower; this stage "
                             "trains it (drop `features`, or vision from `train`)")
        return self


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The share of the peak learning rate at `step`: a linear warm-up from 0, then a cosine down to `min_lr_ratio`
    at `total_steps`, as transformers' get_cosine_with_min_lr_schedule_with_warmup gives it, for torch's
    LambdaLR (importing transformers.optimization costs every training process 5 s: it imports peft)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


VAL_SCORES = ("val_loss", "val_bleu4", "val_cider", "val_rouge_l", "val_exact")  # (lower is better only for the loss)


class ValidationConfig(Strict):
    """Held-out records, measured while training: the mean loss over all of them, and the replies the model
    generates (greedy) for a sample of them, scored against theirs as `pixelray eval` scores captions
    (BLEU-4, CIDEr-D, ROUGE-L) and answers (exact match after VQA normalisation)."""

    records: str | list[str] | None = None  # records of their own (the formats of data.train)
    # or this share of the training images held out: by image id, so an image's records all fall on one side
    # and the same images are held out every run
    fraction: float = Field(0.0, ge=0, lt=0.5)
    generate: int = Field(0, ge=0)  # records per worker whose replies are generated and scored (0: loss only)
    max_new_tokens: int = Field(32, ge=1)
    best: Literal[VAL_SCORES] = "val_loss"  # the checkpoint kept as STAGE/best (least loss, or most of a score)

    @model_validator(mode="after")
    def _one_source(self) -> ValidationConfig:
        if bool(self.records) == bool(self.fraction):
            raise ValueError("validation needs records (held-out records) or fraction (a share held out), "
                             "one of them")
        if self.best != "val_loss" and not self.generate:
            raise ValueError(f"validation.best={self.best} is a generation score: set validation.generate "
                             "(records whose replies are generated at each evaluation)")
        return self

    @property
    def best_order(self) -> Literal["min", "max"]:
        """How `best` ranks checkpoints: the least loss, or the most of a score."""
        return "min" if self.best == "val_loss" else "max"


class DeepSpeedSettings(Strict):
    """The ZeRO config file, the precision, and ZeRO-Offload: the optimizer's state and step (ZeRO-2 or 3), and
    with ZeRO-3 the parameters too, kept in CPU memory instead of the accelerator's (DeepSpeed's
    offload_optimizer and offload_param, device cpu)."""

    config: str = "zero2.json"  # a file in train_jobs/deepspeed/ or a path
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs CUDA
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only


class ScalingSettings(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"  # auto: when the cluster has GPUs
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0)  # worker failures survived, each resuming from the last checkpoint


class FaultDrill(Strict):
    """Raise once at `fail_at_step` on rank 0, to see recovery work (the marker file makes it once)."""

    fail_at_step: int = Field(ge=1)
    marker: str


class TrainConfig(Strict):
    output_dir: str
    model: ModelConfig
    data: DataConfig
    stages: list[StageConfig] = Field(min_length=1)
    validation: ValidationConfig | None = None
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    scaling: ScalingSettings = ScalingSettings()
    seed: int = 0
    tracker: Literal["none", "wandb", "mlflow"] = "none"
    fault: FaultDrill | None = None

    @model_validator(mode="after")
    def _names(self) -> TrainConfig:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        return self

    @model_validator(mode="after")
    def _packing(self) -> TrainConfig:
        if self.data.packing and self.model.family != "pixelray":
            raise ValueError("data.packing is for the pixelray family (its language model takes packed rows by "
                             "their position ids); the hf family's processors and position schemes are trained "
                             "unpacked")
        return self

    @model_validator(mode="after")
    def _features(self) -> TrainConfig:
        if self.model.family != "pixelray" and (named := [s.name for s in self.stages if s.features]):
            raise ValueError(f"stages {named}: training from stored features is for the pixelray family, whose "
                             "projector takes the open_clip tower's patch tokens; hf models train from images")
        return self

    @model_validator(mode="after")
    def _zero_stage(self) -> TrainConfig:
        stage = self.zero_stage()
        if stage is None:  # a file only the cluster has: DeepSpeed reads it there
            return self
        if self.deepspeed.offload_params and stage != 3:
            raise ValueError(f"deepspeed.offload_params needs ZeRO-3 (zero3.json); {self.deepspeed.config} is "
                             f"ZeRO stage {stage}")
        if self.deepspeed.offload_optimizer and stage not in (2, 3):
            raise ValueError(f"deepspeed.offload_optimizer needs ZeRO-2 or ZeRO-3; {self.deepspeed.config} is "
                             f"ZeRO stage {stage}")
        if self.validation and self.validation.generate and stage == 3:
            raise ValueError("validation.generate is not offered under ZeRO-3 (generation reads parameters outside "
                             "the forward passes that gather them): set validation.generate=0 to measure the loss "
                             "only, or use zero2.json")
        return self

    def with_absolute_paths(self) -> TrainConfig:
        """Relative local paths made absolute: Ray Train workers do not run in the driver's directory."""
        def fix(value):
            if isinstance(value, list):
                return [fix(v) for v in value]
            if isinstance(value, str) and "://" not in value and Path(value).exists():
                return str(Path(value).resolve())
            return value

        tree = self.model_dump()
        for section, keys in (("model", ("path", "text", "tokenizer")), ("data", ("train", "image_root", "exclude"))):
            for key in keys:
                tree[section][key] = fix(tree[section][key])
        if tree["validation"]:
            tree["validation"]["records"] = fix(tree["validation"]["records"])
        for stage in tree["stages"]:
            stage["data"], stage["features"] = fix(stage["data"]), fix(stage["features"])
        tree["deepspeed"]["config"] = str(self.deepspeed_path().resolve())
        tree["output_dir"] = tree["output_dir"] if "://" in self.output_dir else str(Path(self.output_dir).resolve())
        return TrainConfig.model_validate(tree)

    def deepspeed_path(self) -> Path:
        path = Path(self.deepspeed.config)
        return path if path.is_file() else DEEPSPEED_DIR / path

    def zero_stage(self) -> int | None:
        """The ZeRO stage of the DeepSpeed config file (None while the file is not there to read)."""
        path = self.deepspeed_path()
        return json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0) if path.is_file() else None


class ClipModelSettings(Strict):
    """A CLIP built from random weights: `config` is an open_clip model config (embed_dim, vision_cfg,
    text_cfg; `open_clip.CLIP(**config)`, a ViT image tower so patch features exist), `preprocess`
    its open_clip preprocess settings (mean, std, interpolation), saved with it."""

    config: dict[str, Any]
    preprocess: dict[str, Any] = Field(default_factory=dict)
    save_dtype: Literal["fp32", "fp16"] = "fp16"  # fp16 halves the file (open_clip loads it into fp32)


class CaptionDataConfig(Strict):
    """Images with captions as JSON lines, {"image", "captions": [...], "shapes"?: [...]} (the shapes
    dataset's captions.jsonl, `pixelray eval`'s references). Records with `shapes` also train on the
    shorter true texts pixelray.shapes.descriptions gives ("a red star"), `short_texts` of the time."""

    train: str
    image_root: str | None = None  # relative image paths are resolved here (default: the file's folder)
    short_texts: float = Field(0.6, ge=0, le=1)


class ContrastiveSchedule(Strict):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(256, ge=2)  # per worker; the loss contrasts every worker's pairs
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1)


class ContrastiveConfig(Strict):
    """`recipe: contrastive`: a CLIP-style image/text model trained with open_clip's ClipLoss
    (train_jobs/contrastive.py). `eval_shapes` > 0 adds the text-to-image precision@10 on that many
    held-out shapes images to the summary (pixelray.shapes.retrieval_precision)."""

    recipe: Literal["contrastive"]
    output_dir: str
    model: ClipModelSettings
    data: CaptionDataConfig
    train: ContrastiveSchedule
    scaling: ScalingSettings = ScalingSettings()
    seed: int = 0
    eval_shapes: int = Field(0, ge=0)

    def with_absolute_paths(self) -> ContrastiveConfig:
        """Relative local paths made absolute: Ray Train workers do not run in the driver's directory."""
        fix = {"train": str(Path(self.data.train).resolve())}
        if self.data.image_root:
            fix["image_root"] = str(Path(self.data.image_root).resolve())
        return self.model_copy(update={"output_dir": str(Path(self.output_dir).resolve()),
                                       "data": self.data.model_copy(update=fix)})


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig | ContrastiveConfig:
    """The YAML file at `path` with the `key.sub.0=value` overrides applied (OmegaConf's dotlist),
    validated; a bad override is a ValueError that names it. `recipe: contrastive` makes it a
    ContrastiveConfig; without `recipe` it is the two-stage VLM recipe's TrainConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.create(yaml.safe_load(Path(path).read_text()) or {})
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not key=value")
        try:
            tree.merge_with_dotlist([override])
        except (OmegaConfBaseException, TypeError) as e:
            raise ValueError(f"override {override!r} does not apply to {path}: {str(e).splitlines()[0]}") from None
    tree = OmegaConf.to_container(tree)
    return (ContrastiveConfig if "recipe" in tree else TrainConfig).model_validate(tree)
