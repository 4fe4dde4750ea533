"""ExCae caption self-improvement (CSI) and corpus captioning jobs."""
