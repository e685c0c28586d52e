"""The conversions of ``stablemtl prepare`` (``stablemtl.data.prepare``), one module per converted dataset.

Each of ``hypersim``, ``vkitti``, ``flying_things_3d`` and ``mid`` holds the StableMTL release's
numbers for its dataset (a block naming the release file it comes from), the files of the
release it follows (``RELEASE_FILES``), where the kit's output differs on purpose
(``DEVIATIONS``), the work on one frame (``convert_frame``) and ``convert``, which lists the
frames of a raw download and runs them; ``common`` holds what they share.
"""
