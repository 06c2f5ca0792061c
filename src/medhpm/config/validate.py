"""Values that parse but cannot work: each is an error that names the key and says what would be valid.
The tables validation needs live here, at the bottom of the layers: the pre-training methods, the encoder
presets (``medhpm.models.vit.build_encoder`` builds from them), the class presets and syntax."""

from __future__ import annotations

import math
import re
from typing import Any


from medhpm.config.schema import Config, ConfigError, PretrainConfig, declarations


METHODS = ("mae", "hpm", "no_lpred", "no_learn_to_mask")


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config key {key!r}: {msg}")


# Encoder size presets (``model.preset``), here so that validation needs nothing above the config;
# ``medhpm.models.vit.build_encoder`` builds from this table.
ENCODER_PRESETS: dict[str, dict] = {
    # micro: for tests and CPU demos. Depth 12 so UNETR's default skips (blocks 3, 6, 9) exist;
    # width 96 is divisible by 6 (sin-cos) and by its 4 heads (head width 24).
    "micro": dict(embed_dim=96, depth=12, num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


# The class syntax of ``finetune.reported`` (and of ``--classes``): a preset name or a ``NAME=VALUE,...``
# list. The rule lives here so that validate() can check it before any data is read; the presets' classes
# (BTCV label values) are ``medhpm.evaluate.classes.PRESETS``, whose names are these.
CLASS_PRESETS = ("btcv8", "btcv13")


# Names end up in CSV cells, JSON keys and NAME=VALUE specs, so separators are not allowed in them.
_CLASS_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def check_class_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _CLASS_NAME_RE.match(name):
        raise ValueError(
            f"Invalid class name {name!r} in {where}: a name starts with a letter and contains only "
            "letters, digits, '_' and '-'."
        )
    return name


def check_label_value(value: object, where: str) -> int:
    if isinstance(value, bool):  # bool is an int subclass; True=1 is almost surely a mistake
        raise ValueError(f"Invalid label value {value!r} in {where}: expected a positive integer.")
    try:
        as_int = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"Invalid label value {value!r} in {where}: expected a positive integer.") from None
    if as_int <= 0:
        raise ValueError(f"Invalid label value {value!r} in {where}: label values must be >= 1 (0 is the background).")
    return as_int


def class_table(pairs: list[tuple[int, str]], where: str) -> dict[int, str]:
    """``{value: name}`` sorted by value from ``(value, name)`` pairs; repeated values or names are errors."""
    if not pairs:
        raise ValueError(f"No classes given in {where}.")
    seen_values: dict[int, str] = {}
    seen_names: dict[str, int] = {}
    for value, name in pairs:
        if value in seen_values:
            raise ValueError(f"Label value {value} is given twice in {where} ({seen_values[value]!r} and {name!r}).")
        if name in seen_names:
            raise ValueError(f"Class name {name!r} is given twice in {where} (values {seen_names[name]} and {value}).")
        seen_values[value] = name
        seen_names[name] = value
    return dict(sorted(seen_values.items()))


def parse_class_list(spec: str) -> str | dict[int, str]:
    """A class string: the preset's name (lower case, one of :data:`CLASS_PRESETS`) or the ``{value: name}``
    of a ``"NAME=VALUE,NAME=VALUE"`` list. Raises ValueError naming the offending token."""
    text = spec.strip()
    if text.lower() in CLASS_PRESETS:
        return text.lower()
    if "=" not in text:
        raise ValueError(
            f"Unknown class preset {text!r}: use one of {sorted(CLASS_PRESETS)} or a 'NAME=VALUE,...' list "
            "such as 'spleen=1,liver=6'."
        )
    where = f"the class list {text!r}"
    pairs = []
    for token in text.split(","):
        token = token.strip()
        if not token:
            continue  # tolerate a trailing comma
        name, sep, value = token.partition("=")
        if not sep or not name.strip() or not value.strip() or "=" in value:
            raise ValueError(f"Bad item {token!r} in {where}: expected NAME=VALUE, e.g. 'liver=6'.")
        name, value = name.strip(), value.strip()
        if name.isdigit() and not value.isdigit():
            raise ValueError(f"Bad item {token!r} in {where}: the order is NAME=VALUE, e.g. '{value}={name}'.")
        at = f"item {token!r} of {where}"
        pairs.append((check_label_value(value, at), check_class_name(name, at)))
    return class_table(pairs, where)


_AXIS_PAIRS = ("LR", "AP", "SI")


def _orientation_ok(code: str) -> bool:
    return (
        len(code) == 3
        and all(c in "LRAPSI" for c in code)
        and sorted("".join(p for p in _AXIS_PAIRS if c in p) for c in code) == sorted(_AXIS_PAIRS)
    )


_INTERVAL = re.compile(r"^([\[(])\s*([-+.\deE]+)\s*,\s*([-+.\deE]+)\s*([\])])$")


def rule_problem(value: Any, rule: str, help: str = "") -> str | None:
    """What is wrong with ``value`` under a field's ``rule`` (:func:`medhpm.config.schema.setting`: ``">= N"``,
    ``"> N"``, an interval such as ``"[0, 1)"``, or choices ``"a | b"``), None when it obeys. ``help`` is
    said after a range's error. A rule it cannot read raises ValueError (a mistake in the schema)."""
    if "|" in rule:
        choices = [c.strip() for c in rule.split("|")]
        return None if value in choices else f"{value!r} is not one of {', '.join(choices)}"
    tail = f" ({help})" if help else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if not math.isfinite(value):
        return f"{value} is out of range: must be a finite number{tail}"
    if rule.startswith(">="):
        low = float(rule[2:])
        return None if value >= low else f"{value} is out of range: must be at least {rule[2:].strip()}{tail}"
    if rule.startswith(">"):
        low = float(rule[1:])
        what = "positive" if low == 0 else f"above {rule[1:].strip()}"
        return None if value > low else f"{value} is out of range: must be {what}{tail}"
    m = _INTERVAL.match(rule)
    if not m:
        raise ValueError(f"config rule {rule!r} is not >= N, > N, an interval or choices")
    lo, hi = float(m.group(2)), float(m.group(3))
    ok = (value >= lo if m.group(1) == "[" else value > lo) and (value <= hi if m.group(4) == "]" else value < hi)
    return None if ok else f"{value} is out of range: must lie in {rule}{tail}"


def _check_rules(cfg: Config) -> None:
    """Every field's declared rule (:func:`medhpm.config.schema.declarations`), in declaration order; and
    every number of the config finite, with a rule or without (``data.a_max=inf`` is no window)."""
    for key, _, rule, help in declarations():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        numbers = value if isinstance(value, (tuple, list)) else [value]
        for v in numbers:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key {key!r}: {value} is not a finite number")
        if rule:
            problem = rule_problem(value, rule, help)
            _check(problem is None, key, problem or "")


def _check_snapshot_steps(p: PretrainConfig) -> None:
    """``pretrain.snapshot_steps``: integers >= 1, strictly increasing, at most the run's optimizer steps
    where ``steps_per_epoch`` fixes them (with 0 the trainer knows them only once the data is read, and
    warns at the start about listed steps beyond the run)."""
    key, steps = "pretrain.snapshot_steps", tuple(p.snapshot_steps)
    for s in steps:
        _check(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1,
            key,
            f"{s!r} is out of range: each entry must be an optimizer step, an integer of at least 1",
        )
    for a, b in zip(steps, steps[1:]):
        _check(b > a, key, f"{list(steps)} must be strictly increasing ({b} follows {a})")
    if steps and p.steps_per_epoch > 0:
        total = p.epochs * p.steps_per_epoch
        _check(
            steps[-1] <= total,
            key,
            f"step {steps[-1]} is beyond the run: it has {total} optimizer steps (pretrain.epochs {p.epochs} x "
            f"pretrain.steps_per_epoch {p.steps_per_epoch})",
        )


def validate(cfg: Config) -> Config:
    """Raise a :class:`ConfigError` naming the key for any value outside its range: each field's declared
    rule (:func:`medhpm.config.schema.setting`), then the rules that involve other keys or tables; called on
    every resolved config, before any data is read or any folder is made."""
    d, m, p, f = cfg.data, cfg.model, cfg.pretrain, cfg.finetune
    _check_rules(cfg)  # each field's own rule; below, the rules that involve other keys or tables
    # data
    _check(
        _orientation_ok(d.orientation),
        "data.orientation",
        f"{d.orientation!r} must be three letters, one of each pair L/R, A/P, S/I (e.g. RAS or LPS)",
    )
    _check(
        len(d.spacing) == 3 and all(s > 0 for s in d.spacing),
        "data.spacing",
        f"{tuple(d.spacing)} must be three positive voxel sizes (mm)",
    )
    _check(d.a_max > d.a_min, "data.a_max", f"HU window [data.a_min, data.a_max] = [{d.a_min}, {d.a_max}] is empty")
    _check(d.b_max > d.b_min, "data.b_max", f"output range [data.b_min, data.b_max] = [{d.b_min}, {d.b_max}] is empty")
    _check(d.pos + d.neg > 0, "data.pos", "data.pos and data.neg are both 0: no crop centre could be drawn")
    # model
    _check(m.preset in ENCODER_PRESETS, "model.preset", f"{m.preset!r} is not one of {', '.join(ENCODER_PRESETS)}")
    width, heads = ENCODER_PRESETS[m.preset]["embed_dim"], ENCODER_PRESETS[m.preset]["num_heads"]
    _check(width % heads == 0, "model.preset", f"width {width} is not divisible by {heads} heads")
    _check(len(d.roi) == 3 and all(r > 0 for r in d.roi), "data.roi", f"{tuple(d.roi)} must be three positive sizes")
    _check(
        all(r % m.patch_size == 0 for r in d.roi),
        "data.roi",
        f"{tuple(d.roi)} is not divisible by the patch size {m.patch_size} in every axis",
    )
    _check(
        m.decoder_dim % m.decoder_heads == 0,
        "model.decoder_heads",
        f"decoder width {m.decoder_dim} is not divisible by {m.decoder_heads} heads",
    )
    if m.skip_blocks is not None:
        depth, blocks = ENCODER_PRESETS[m.preset]["depth"], tuple(m.skip_blocks)
        _check(
            all(1 <= b <= depth for b in blocks) and list(blocks) == sorted(set(blocks)),
            "model.skip_blocks",
            f"{blocks} must be distinct increasing block numbers within the encoder depth 1..{depth}",
        )
        if m.patch_size & (m.patch_size - 1) == 0 and m.patch_size > 1:
            n = m.patch_size.bit_length() - 2  # log2(patch) - 1 intermediate resolutions
            _check(
                len(blocks) == n,
                "model.skip_blocks",
                f"{blocks} has {len(blocks)} block(s); with patch {m.patch_size} UNETR needs {n}",
            )
    # both training stages
    for sec, name in ((p, "pretrain"), (f, "finetune")):
        _check(
            0 <= sec.min_lr <= sec.lr,
            f"{name}.min_lr",
            f"{sec.min_lr} is out of range: must lie in [0, {name}.lr] = [0, {sec.lr}]",
        )
        _check(
            len(sec.betas) == 2 and all(0 <= b < 1 for b in sec.betas),
            f"{name}.betas",
            f"{tuple(sec.betas)} must be two values in [0, 1)",
        )
    # pre-training
    _check(p.method in METHODS, "pretrain.method", f"{p.method!r} is not one of {', '.join(METHODS)}")
    _check(
        p.prediction_loss in ("ranking", "absolute"),
        "pretrain.prediction_loss",
        "must be ranking or absolute"
        + (" ('relative' is now called 'ranking')" if p.prediction_loss == "relative" else ""),
    )
    n_tokens = math.prod(int(r) // m.patch_size for r in d.roi)  # roi and patch size were checked above
    _check(
        p.teacher_views == 0 or 2 <= p.teacher_views <= n_tokens,
        "pretrain.teacher_views",
        f"{p.teacher_views} is out of range: must be 0 (one view per visible share 1 - mask_ratio) or 2 to "
        f"{n_tokens} (the tokens of a data.roi crop)",
    )
    _check(
        p.teacher_views == 0 or p.teacher_view == "masked",
        "pretrain.teacher_views",
        f"{p.teacher_views} views are only used with pretrain.teacher_view=masked (it is {p.teacher_view!r}): "
        "set pretrain.teacher_view=masked, or leave teacher_views at 0",
    )
    _check_snapshot_steps(p)
    # fine-tuning
    try:
        reported = parse_class_list(f.reported)
    except ValueError as e:
        raise ConfigError(f"config key 'finetune.reported': {e}") from None
    if isinstance(reported, dict):  # a preset always holds label 1, below any num_classes >= 2
        _check(
            min(reported) < f.num_classes,
            "finetune.reported",
            f"none of its label values {sorted(reported)} is below finetune.num_classes={f.num_classes}: "
            "nothing would be reported",
        )
    # runtime
    r = cfg.runtime
    _check(
        r.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", r.device) is not None,
        "runtime.device",
        f"{r.device!r} is not a device: use auto, cpu, cuda or cuda:N",
    )
    r.compile = compile_mode(r.compile)
    return cfg


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def compile_mode(value: Any) -> str:
    """``runtime.compile`` as one of :data:`COMPILE_MODES`; the old switch (``true``/``false``, also as the
    strings a YAML file or ``key=value`` gives for it) reads as ``default``/``none``."""
    if isinstance(value, bool):
        return "default" if value else "none"
    text = str(value).strip().lower()
    old = {"true": "default", "false": "none", "yes": "default", "no": "none", "on": "default", "off": "none"}
    text = old.get(text, text)
    if text not in COMPILE_MODES:
        raise ConfigError(
            f"config key 'runtime.compile': {value!r} is not one of {', '.join(COMPILE_MODES)} "
            "(or the old switch true/false)"
        )
    return text
