"""CLIP-ReID in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy: `import clipreid_jax` stays light; the extractor pulls in JAX and the model on first use.
  if name == "FeatureExtractor":
    from clipreid_jax.inference import FeatureExtractor
    return FeatureExtractor
  raise AttributeError(name)
