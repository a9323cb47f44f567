"""The settings of the batch jobs, typed: what every job takes (BatchConfig) and each job's own. The
command line's options are made from these fields (pixelray.cli.options), one per field with a
description, so this module stays light: nothing here imports Ray or torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pixelray.device import DeviceName, DtypeName, QuantizationName
from pixelray.generators import DEFAULT_PROMPT, GenerationConfig, GeneratorSpec
from pixelray.images import FILE_LIMITS, ImageLimits

if TYPE_CHECKING:
    from pixelray.encoders import EncoderSpec

BATCH_SIZE = 8
ENGINE_BATCH_SIZE = 256
POOL_SIZE = ("default: one per GPU; on CPU-only nodes one single-threaded actor per core up to 8 cores, "
             "then one 4-thread actor per 4 cores")


class BatchConfig(BaseModel):
    """The settings every batch job takes (`pixelray embed`, `pixelray caption`); the command line's
    options are made from these fields and their descriptions."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="a folder, a glob, a list file (.txt, one path or URI per line), or Parquet/tar "
                                   "shards; any pyarrow filesystem URI (s3://, gs://, ...) works")
    out: str = Field(description="the store: an output directory or URI")
    batch_size: int = Field(BATCH_SIZE, ge=1, description="images per model call")
    resume: bool = Field(False, description="continue a store, skipping the items already in it, except those "
                                            "that failed for a passing reason (error_type transient: an LLM "
                                            "server down, a timeout, HTTP 429 or 5xx), which are tried again")
    overwrite: bool = Field(False, description="replace an existing store")
    device: DeviceName = Field("auto", description="where the model runs")
    dtype: DtypeName = Field("auto", description="auto: bf16 on CUDA when supported, fp16 on other CUDA, else fp32")
    rows_per_file: int = Field(1000, ge=1, description="rows per output Parquet file: the unit a crash can lose")
    max_image_bytes: int = Field(FILE_LIMITS.max_bytes, ge=1, description="larger files are error rows")
    max_image_pixels: int = Field(FILE_LIMITS.max_pixels, ge=1,
                                  description="larger images are error rows, refused before decoding")
    max_task_retries: int = Field(2, ge=0, description="times a block is tried again after its worker died (a "
                                                       "crash, an out-of-memory kill); then its images are tried "
                                                       "one by one, and one that still kills its worker is an "
                                                       "error row (worker_crashed)")
    max_crashed_blocks: int = Field(16, ge=0)  # blocks left out that way before the job stops instead
    # differs from the actors' request, so that Ray keeps the decode and model stages apart
    decode_cpus: float = Field(1.0, gt=0)
    address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, else a local Ray "
                                                  "instance)")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


class EmbedConfig(BatchConfig):
    """Settings of one `pixelray embed` run."""

    encoder: str = Field("default", description="registry name (see `pixelray models`), local directory or hub id")
    batch_size: int = Field(32, ge=1, description="images per encoder call")
    dtype: DtypeName = Field("fp32", description="fp32, bf16, fp16 (CUDA only) or auto (bf16 or fp16 on CUDA)")
    patches: bool = Field(False, description="also store patch features [num_patches, dim]")
    normalize: bool = Field(False, description="L2-normalise embeddings and patch features")
    num_encoders: int | None = Field(None, ge=1, description=f"encoder actors; {POOL_SIZE}")
    text_column: str | None = Field(None, description="embed the texts of this column instead of images (with the "
                                                      "encoder's text tower, into its images' space): INPUT is a "
                                                      "`pixelray caption` store (column caption) or Parquet / "
                                                      "JSON-lines files")
    columns: list[str] = Field([], description="input columns to keep in the store beside each embedding (comma-"
                                               "separated), e.g. url,caption: from Parquet shards, CSV/TSV list "
                                               "files or text files")

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, value):
        values = [value] if isinstance(value, str) else value  # `--columns a,b` and `--columns a --columns b`
        return [c.strip() for v in values for c in str(v).split(",") if c.strip()]

    @model_validator(mode="after")
    def _text(self) -> "EmbedConfig":
        if self.text_column and self.patches:
            raise ValueError("--patches applies to images, not to --text-column")
        reserved = {"image_id", "text_id", "path", "text", "encoder", "width", "height", "embedding",
                    "patch_features", "error_type", "error"}
        if clash := reserved.intersection(self.columns):
            raise ValueError(f"--columns {sorted(clash)[0]}: the store has a column of that name already")
        return self

    def manifest(self, spec: EncoderSpec) -> dict:
        """What must not change between a run and its resume."""
        own = {"modality": "text", "text_column": self.text_column} if self.text_column else {}
        return {"job": "embed", "encoder": spec.name, "encoder_source": spec.source,
                "pretrained": spec.pretrained, "patches": self.patches, "normalize": self.normalize,
                "dtype": self.dtype, **own, **({"columns": self.columns} if self.columns else {})}


class CaptionConfig(BatchConfig):
    """Settings of one `pixelray caption` run."""

    input: str | None = Field(None, description="as for `pixelray embed`; optional with --questions, which names "
                                                "the images")
    model: str = Field("shapes-demo", description="registry name (`pixelray models`), hf:ID, hub id or folder, or "
                                                  "hybrid:ENCODER?url=URL&model=NAME (an encoder + an "
                                                  "OpenAI-compatible LLM server such as LM Studio), or "
                                                  "remote:MODEL?url=URL[&url=URL...] (OpenAI-compatible vision "
                                                  "servers, sent the images)")
    prompt: str = Field(DEFAULT_PROMPT, description="the instruction for every image")
    question: str | None = Field(None, description="one question asked of every image (VQA)")
    questions: str | None = Field(None, description="JSON lines or Parquet file of {image, question} rows (VQA, "
                                                    "one answer per row)")
    batch_size: int | None = Field(None, ge=1, description=f"images per model call (default: {BATCH_SIZE}; "
                                                           f"{ENGINE_BATCH_SIZE} for the vllm engine, whose scheduler "
                                                           "keeps its running batch full from them; a remote model's "
                                                           "max_in_flight)")
    generation: GenerationConfig = GenerationConfig()
    quantization: QuantizationName | None = Field(None, description="bitsandbytes (CUDA only)")
    num_generators: int | None = Field(None, ge=1, description=f"generator actors; {POOL_SIZE}")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm engine: the GPUs of one node each model actor "
                                                           "splits the model over (and reserves)")
    max_side: int = Field(2048, ge=16)  # larger images are downscaled before they travel to the actors
    exclude: str | None = Field(None, description="a `pixelray dedup` table (Parquet): the images it does not keep "
                                                  "are left out")

    @model_validator(mode="after")
    def _one_source(self) -> "CaptionConfig":
        if self.question and self.questions:
            raise ValueError("give --question or --questions, not both")
        if self.questions is None and self.input is None:
            raise ValueError("INPUT is required unless --questions names the images")
        return self

    def model_batch_size(self, spec: GeneratorSpec) -> int:
        if self.batch_size:
            return self.batch_size
        if spec.backend == "remote":  # a request per image: a batch is what one actor has in flight at once
            from pixelray.generators.remote import RemoteOptions

            return RemoteOptions.from_source(spec.source).max_in_flight
        return ENGINE_BATCH_SIZE if spec.backend == "vllm" else BATCH_SIZE

    def manifest(self, spec: GeneratorSpec) -> dict:
        """What must not change between a run and its resume."""
        return {"job": "caption", "model": spec.identity,
                "model_source": spec.identity if spec.backend == "remote" else spec.source,
                "prompt": None if self.questions or self.question else self.prompt, "question": self.question,
                "vqa": bool(self.questions), "generation": self.generation.model_dump(),
                "quantization": self.quantization}
