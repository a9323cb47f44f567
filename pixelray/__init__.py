"""pixelray: batch jobs, training and serving for vision-language models, on Ray.

The library's front door, for notebooks and scripts:

    import pixelray

    encoder = pixelray.create_encoder("clip")            # a registry name, a model folder or a hub id
    out = encoder([image, ...])                          # out.embedding [batch, dim], out.patches [batch, patches, dim]

    model = pixelray.create_generator("shapes-demo")     # any backend: hf, pixelray, text, hybrid, mlx
    model.caption(image)                                 # "a red circle at the top left"
    model.answer(image, "What colour is the circle?")    # "red"
    history = []                                         # the turns so far, with their images
    model.chat("What is in the image?", image=image, history=history)
    model.chat("Where is it?", history=history)
    model.caption_batch(images), model.answer_batch(images, questions)   # one batched generate each

    pixelray.open_image("photo.jpg")                     # checked, EXIF-rotated RGB, or ImageError
    pixelray.list_encoders(), pixelray.list_generators() # what the registries know

Everything else is private by convention: import it from its module, knowing that it may change.
The names above are imported on first use, so `import pixelray` stays cheap.
"""

import importlib
import os

__version__ = "0.1.0"

# The layers that build on the library keep their own folders in the repository (pipelines/, serve_apps/,
# train_jobs/, cluster/) and are this package's subpackages: setuptools' package-dir puts them inside it
# when installed; in a source checkout (an editable install, or the working dir Ray ships with a
# submitted job) they are found beside it.
_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(_HERE)
if not os.path.isdir(os.path.join(_HERE, "pipelines")) and os.path.isfile(
        os.path.join(_CHECKOUT, "pipelines", "__init__.py")):
    __path__.append(_CHECKOUT)

_PUBLIC = {
    "create_encoder": "pixelray.encoders", "list_encoders": "pixelray.encoders", "Encoder": "pixelray.encoders",
    "EncoderOutput": "pixelray.encoders",
    "create_generator": "pixelray.generators", "list_generators": "pixelray.generators",
    "Generator": "pixelray.generators", "GenerationConfig": "pixelray.generators",
    "GenerationResult": "pixelray.generators",
    "open_image": "pixelray.images", "decode_image": "pixelray.images", "ImageError": "pixelray.images",
    "ImageLimits": "pixelray.images",
    "PixelrayError": "pixelray.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pixelray' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
