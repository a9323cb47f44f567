"""Models come from a hub id or a local directory; offline, a missing one must say how to get it."""

from __future__ import annotations


class ModelNotAvailableError(RuntimeError):
    """A model that cannot be loaded (not cached offline, wrong path, wrong files)."""


def not_available(source: str, err: Exception) -> ModelNotAvailableError:
    repo = source.removeprefix("hf-hub:").split(" ")[0]
    return ModelNotAvailableError(
        f"cannot load {source!r}: {err}\n"
        f"If it is a hub model and this machine is offline, download it where there is network "
        f"(`huggingface-cli download {repo}`), copy the cache (HF_HOME) or the folder here, "
        f"and pass the folder as the model name."
    )
