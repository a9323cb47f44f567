"""Patch features -> a compact text summary an LLM can read, and the prompt templates around it.

    summary = FeatureSummarizer(num_samples=6, dims=8).summarize(features)   # features [num_patches, dim]
    summary.visual_summary   # '{"patches": 49, "grid": "7x7", "mean": [...], "spread": 0.83, "salient": [...]}'
    PromptTemplate("caption").render(summary, "Describe the image.")

Mean pooling gives the image's overall feature (`feature_mean`); strategic sampling keeps the
`num_samples` patches that differ most from it (the salient ones), with their place on the patch
grid ("top left", "center", ...). Every vector is shortened to `dims` numbers by average-pooling
its channels in `dims` groups, so the summary stays a few hundred characters at any encoder width.

Templates are `str.format` strings over PLACEHOLDERS; an unknown placeholder is an error when the
template is made, not at the first request.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass

import torch

PLACEHOLDERS = {
    "num_patches": "how many patch features the encoder gave",
    "feature_mean": "the mean-pooled feature, shortened to `dims` numbers",
    "sample_features": "the salient patches: place on the grid, saliency and shortened feature",
    "visual_summary": "all of the above as one compact JSON object",
    "prompt": "the user's request (when absent, it follows the template as its own paragraph)",
}
TEMPLATES = {
    "caption": (
        "A vision encoder looked at an image and summarised its patch features as JSON "
        "(`mean`: the average feature; `salient`: the patches that stand out, with where they are):\n"
        "{visual_summary}\n\n{prompt}\nAnswer in one sentence."),
    "detailed": (
        "A vision encoder split an image into {num_patches} patches.\n"
        "Mean feature: {feature_mean}\n"
        "Salient patches (position, saliency, feature): {sample_features}\n\n"
        "{prompt}\nDescribe what the image most likely shows, noting where the salient regions are."),
}
_REGIONS = ("top", "", "bottom"), ("left", "", "right")


@dataclass(frozen=True)
class FeatureSummary:
    num_patches: int
    feature_mean: list[float]
    sample_features: list[dict]
    spread: float  # mean distance of the patches from the mean feature

    @property
    def visual_summary(self) -> str:
        side = math.isqrt(self.num_patches)
        grid = f"{side}x{side}" if side * side == self.num_patches else None
        return _compact({"patches": self.num_patches, "grid": grid, "mean": self.feature_mean,
                         "spread": self.spread, "salient": self.sample_features})

    def fields(self) -> dict[str, str | int]:
        return {"num_patches": self.num_patches, "feature_mean": _compact(self.feature_mean),
                "sample_features": _compact(self.sample_features), "visual_summary": self.visual_summary}


class FeatureSummarizer:
    def __init__(self, num_samples: int = 6, dims: int = 8, decimals: int = 3):
        if num_samples < 0 or dims < 1 or decimals < 0:
            raise ValueError("num_samples >= 0, dims >= 1 and decimals >= 0 are needed")
        self.num_samples, self.dims, self.decimals = num_samples, dims, decimals

    def summarize(self, features: torch.Tensor) -> FeatureSummary:
        """One image's patch features [num_patches, dim] (a leading batch of 1 is accepted)."""
        if features.dim() == 3 and features.shape[0] == 1:
            features = features[0]
        if features.dim() != 2 or features.shape[0] == 0:
            raise ValueError(f"expected one image's features [num_patches, dim], got shape {list(features.shape)}")
        features = features.float()
        mean = features.mean(dim=0)
        distance = (features - mean).norm(dim=1)
        picks = distance.topk(min(self.num_samples, len(features))).indices.sort().values
        samples = [{"at": _where(int(i), len(features)), "saliency": self._round(distance[i]),
                    "feature": self._short(features[i])} for i in picks]
        return FeatureSummary(num_patches=len(features), feature_mean=self._short(mean), sample_features=samples,
                              spread=self._round(distance.mean()))

    def _short(self, vector: torch.Tensor) -> list[float]:
        """Average-pool a vector's channels into `dims` groups."""
        groups = torch.tensor_split(vector, min(self.dims, len(vector)))
        return [self._round(g.mean()) for g in groups]

    def _round(self, value: torch.Tensor) -> float:
        return round(float(value), self.decimals)


class PromptTemplate:
    """A named template (TEMPLATES) or a custom `str.format` string over PLACEHOLDERS."""

    def __init__(self, template: str = "caption"):
        self.text = TEMPLATES.get(template, template)
        fields = set()
        try:
            for _, field, spec, conversion in string.Formatter().parse(self.text):
                if field is None:
                    continue
                if field == "" or field.isdigit():
                    raise ValueError("positional placeholders ({} or {0}) are not allowed; name one of "
                                     + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
                fields.add(field)
        except ValueError as e:
            raise ValueError(f"bad prompt template {self.text[:60]!r}: {e}") from None
        if unknown := sorted(fields - set(PLACEHOLDERS)):
            raise ValueError(f"prompt template has unknown placeholders {', '.join(unknown)}; known: "
                             + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                             + f" (named templates: {', '.join(TEMPLATES)})")
        if not fields & {"num_patches", "feature_mean", "sample_features", "visual_summary"}:
            raise ValueError("prompt template uses none of the feature placeholders, so the LLM would never see "
                             "the image: include {visual_summary} (or {feature_mean}, {sample_features})")
        self.fields = fields

    def render(self, summary: FeatureSummary, prompt: str) -> str:
        text = self.text.format(**summary.fields(), prompt=prompt)
        return text if "prompt" in self.fields or not prompt else f"{text}\n\n{prompt}"


def _where(index: int, num_patches: int) -> str:
    """A patch's place on a square grid: "top left", "center", ... (the index when not square)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        return f"patch {index}"
    row, col = divmod(index, side)
    vertical, horizontal = (_REGIONS[0][min(2, 3 * row // side)], _REGIONS[1][min(2, 3 * col // side)])
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))
