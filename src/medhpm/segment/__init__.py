"""Fine-tuning: the UNETR training loop and the sliding-window predictor. The layer-decay parameter groups
live in ``medhpm.runtime.param_groups`` (pre-training uses its weight-decay split too)."""
