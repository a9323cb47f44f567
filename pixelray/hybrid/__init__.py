"""The LM Studio hybrid: a vision encoder's features, summarised to text, captioned by any
OpenAI-compatible LLM server (LM Studio, vLLM, Ollama, llama.cpp, mlx-vlm, pixelray's own /v1)."""

from pixelray.hybrid.client import Completion, LLMServerError, LMStudioClient, LMStudioConfig, check_lm_studio_available
from pixelray.hybrid.features import VisionFeatureExtractor
from pixelray.hybrid.model import HybridConfig, HybridPixelLLM, generate_caption_with_lm_studio
from pixelray.hybrid.summary import PLACEHOLDERS, TEMPLATES, FeatureSummarizer, FeatureSummary, PromptTemplate

__all__ = ["Completion", "LLMServerError", "LMStudioClient", "LMStudioConfig", "check_lm_studio_available",
           "VisionFeatureExtractor", "HybridConfig", "HybridPixelLLM", "generate_caption_with_lm_studio",
           "PLACEHOLDERS", "TEMPLATES", "FeatureSummarizer", "FeatureSummary", "PromptTemplate"]
