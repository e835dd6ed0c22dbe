"""The translation task family (image → image, pix2pix-style): config.py, task.py, parallelize.py."""
