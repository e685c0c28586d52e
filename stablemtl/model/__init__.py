"""The StableMTL model on stock diffusers components.

One module per job: ``base`` (load an SD2-layout base, build the tiny one), ``vae`` and ``prior``
(the tiny base's VAE and generative prior, pretrained here), ``sd2`` (Stable Diffusion 2's
tokenizer, configs and random-weight bases), ``streams`` (the single- and multi-stream models and
the task attention), ``pipeline`` (``StableMTLPipeline``; saving and loading a model),
``fingerprint`` (hashes of weights), ``release`` (released checkpoints -> pipeline folders).
"""
