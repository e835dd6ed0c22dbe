"""The caption task family: config.py (model node), task.py (LightningModule), parallelize.py (FSDP2)."""
