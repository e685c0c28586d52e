"""The StableMTL model on stock diffusers components: base loading, streams, pipeline."""
