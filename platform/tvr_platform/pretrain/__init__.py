"""``tvr pretrain``: image-text contrastive pre-training of a CLIP backbone (see :mod:`.recipe`)."""
