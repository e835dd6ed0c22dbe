"""xmodal: cross-media generative training on Lightning + Hydra + WebDataset + W&B."""

__version__ = "0.1.0"
