"""Files in and out: checkpoints, safe pickle import, datasets, images, atomic writes."""
