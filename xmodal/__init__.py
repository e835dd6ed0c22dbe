"""xmodal: cross-media generative training on Lightning + Hydra + WebDataset + W&B."""

import warnings

__version__ = "0.1.0"

# Lightning imports torchmetrics, whose BERTScore imports transformers when it is installed, which
# imports tqdm.auto: in a Jupyter kernel without ipywidgets that warns "IProgress not found" once,
# before any xmodal code could filter it later. xmodal draws no tqdm bar, so the tip does not apply.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")


def load(ckpt, device="cpu"):  # noqa: ANN001, ANN201 (typed in xmodal.api; imported lazily: no torch at import)
    """Load a trained checkpoint: ``xmodal.load(path).caption(files)`` / ``.generate(caption=[...])``."""
    from xmodal.api import load as _load

    return _load(ckpt, device)
