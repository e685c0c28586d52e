"""Data: file formats (``formats``: generic; ``annotations``: each dataset's conventions), the procedural
world (``raycast``, ``synthetic``, ``mini``, ``raw``), the datasets (``sources``: ``source_base``,
``training_sources``, ``evaluation_sources``), split lists (``splits``), the training mix (``mixing``),
image operations (``imaging``, ``transforms``), and the preparation of raw downloads (``prepare``: ``layout``,
the converters of ``convert/``, the resumable jobs of ``jobs``). Stage 01's work is
``stablemtl.stages.prepare_data``."""
