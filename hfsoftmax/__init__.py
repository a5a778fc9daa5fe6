"""hfsoftmax: the torch side (backbones, heads, data, training, evaluation)."""
__version__ = "0.1.0"
