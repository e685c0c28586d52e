"""stablemtl: a reproducible research kit for StableMTL (arXiv 2506.08013).

Importing the package is cheap on purpose (no torch, no diffusers): import the
submodule you need, e.g. ``from stablemtl import tasks, metrics``.
"""

__version__ = "0.1.0"
