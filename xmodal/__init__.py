"""xmodal: cross-media generative training on Lightning + Hydra + WebDataset + W&B."""

__version__ = "0.1.0"


def load(ckpt, device="cpu"):  # noqa: ANN001, ANN201 (typed in xmodal.api; imported lazily: no torch at import)
    """Load a trained checkpoint: ``xmodal.load(path).caption(files)`` / ``.generate(caption=[...])``."""
    from xmodal.api import load as _load

    return _load(ckpt, device)
