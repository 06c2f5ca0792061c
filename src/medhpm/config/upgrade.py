"""Keys of earlier versions: an old key in a YAML file or an override is an error that gives today's name;
a config stored by an earlier version (a checkpoint, a run folder) is read in today's names."""

from __future__ import annotations

from typing import Optional, Sequence


from medhpm.config.schema import ConfigError


# Keys of earlier versions: an old key in a YAML file or an override is an error that gives today's name.
# The predictor's sliding-window settings were the `evaluate:` section (evaluation never read them).
RENAMED_KEYS = {"evaluate": "inference", "pretrain.pred_loss": "pretrain.prediction_loss"}


_RENAMED_NOTES = {"pretrain.pred_loss": " (values: ranking | absolute; 'relative' is now 'ranking')"}


REMOVED_KEYS = {  # keys nothing read
    "evaluate.output_on_cpu": "`medhpm predict --gpu-output` (Predictor(output_on_cpu=False)) keeps the output "
    "on the GPU",
    "evaluate.save_probabilities": "`medhpm predict --probabilities` (predict_path(save_probabilities=True)) "
    "writes the class probabilities",
    **{
        f"pretrain.{k}": "the EMA schedule is now a share of the run's optimizer steps: pretrain.ema_horizon_start, "
        "pretrain.ema_horizon_end and pretrain.ema_ramp (docs/method.md)"
        for k in ("ema_m_start", "ema_m_end", "ema_ramp_epochs")
    },
}


def _old_key(key: str) -> Optional[str]:
    """What to say about ``key`` if it is a key of an earlier version, else None."""
    if key in REMOVED_KEYS:
        return f"config key {key!r} was removed: {REMOVED_KEYS[key]}"
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return f"config key {key!r} is now called {new + key[len(old) :]!r}{_RENAMED_NOTES.get(old, '')}"
    return None


def _reject_old_keys(keys: Sequence[str], where: str) -> None:
    for key in keys:
        old = _old_key(key)
        if old:
            raise ConfigError(f"{old} (in {where})")


def _upgrade(data: dict) -> dict:
    """A stored config with the keys of :data:`RENAMED_KEYS` renamed and those of :data:`REMOVED_KEYS` dropped."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    if isinstance(data.get("evaluate"), dict):
        old = data.pop("evaluate")
        for key in REMOVED_KEYS:
            old.pop(key.split(".", 1)[1], None)
        data.setdefault("inference", old)
    pre = data.get("pretrain")
    for key in REMOVED_KEYS:  # a run of an earlier version resumes with today's EMA schedule
        if key.startswith("pretrain.") and isinstance(pre, dict):
            pre.pop(key.split(".", 1)[1], None)
    if isinstance(pre, dict) and "pred_loss" in pre:
        value = pre.pop("pred_loss")
        pre.setdefault("prediction_loss", "ranking" if value == "relative" else value)
    if isinstance(pre, dict) and pre and "teacher_view" not in pre:  # resolved before teacher_view existed:
        pre["teacher_view"] = "full"  # its teacher scored the full volume, and it keeps doing so
    return data
