"""Models come from a hub id or a local directory; offline, a missing one must say how to get it."""

from __future__ import annotations

from pixelray.errors import PixelrayError


class ModelNotAvailableError(PixelrayError):
    """A model that cannot be loaded (not cached offline, wrong path, wrong files)."""

    status = 404
    code = "model_not_available"


def not_available(source: str, err: Exception) -> ModelNotAvailableError:
    repo = source.removeprefix("hf-hub:").split(" ")[0]
    reason = " ".join(str(err).split())  # one line, however the loader formatted it
    return ModelNotAvailableError(
        f"cannot load {source!r}: {reason}. If it is a hub model and this machine is offline, download it "
        f"where there is network (`huggingface-cli download {repo}`), copy the cache (HF_HOME) or the folder "
        "here, and pass the folder as the model name."
    )
