"""pixelray: Ray-based batch, training and serving pipelines for vision-language models.

The core library: image intake (`pixelray.images`), the model registry
(`pixelray.encoders`), devices, and the command line (`pixelray.cli`).
"""

__version__ = "0.1.0"
