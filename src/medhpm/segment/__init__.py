"""Fine-tuning: layer-decay parameter groups, the UNETR training loop, the sliding-window predictor."""

from medhpm.segment.layer_decay import param_groups_layer_decay, param_groups_weight_decay

__all__ = ["param_groups_layer_decay", "param_groups_weight_decay"]
