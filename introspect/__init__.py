"""introspect: the science core (plain PyTorch + transformers + peft). Never imports Ray."""

__version__ = "0.1.0"
