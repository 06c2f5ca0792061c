"""Class (organ) definitions for evaluation: BTCV label values, the protocol's reported subset, parsing.

A class set is a ``dict[int, str]`` from label value to organ name (snake_case), ordered by label value.
The BTCV tables come from :mod:`medhpm.data.labels`, the package's one BTCV label table.
"""

from __future__ import annotations

import re
from typing import Mapping

from medhpm.data.labels import BTCV13, PROTOCOL_ORGANS


# The 8 organs the paper's Table 1 reports (TransUNet's protocol), see docs/PROTOCOL.md.
BTCV8: dict[int, str] = {v: BTCV13[v] for v in PROTOCOL_ORGANS}

PRESETS: dict[str, dict[int, str]] = {"btcv8": BTCV8, "btcv13": BTCV13}

# Column headers as in the paper's Table 1; unknown names fall back to a title-cased name.
DISPLAY_NAMES: dict[str, str] = {
    "spleen": "Spleen",
    "right_kidney": "Kidney(R)",
    "left_kidney": "Kidney(L)",
    "gallbladder": "Gallbladder",
    "esophagus": "Esophagus",
    "liver": "Liver",
    "stomach": "Stomach",
    "aorta": "Aorta",
    "inferior_vena_cava": "IVC",
    "portal_splenic_vein": "Veins",
    "pancreas": "Pancreas",
    "right_adrenal": "Adrenal(R)",
    "left_adrenal": "Adrenal(L)",
}

# Names end up in CSV cells, JSON keys and NAME=VALUE specs, so separators are not allowed in them.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def display_name(name: str) -> str:
    """Table header for an organ name: ``"right_kidney"`` -> ``"Kidney(R)"``, ``"left_lung"`` -> ``"Left Lung"``."""
    if name in DISPLAY_NAMES:
        return DISPLAY_NAMES[name]
    return " ".join(part.capitalize() for part in re.split(r"[_\-]+", name) if part)


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"Invalid class name {name!r} in {where}: a name starts with a letter and contains only "
            "letters, digits, '_' and '-'."
        )
    return name


def _check_value(value: object, where: str) -> int:
    if isinstance(value, bool):  # bool is an int subclass; True=1 is almost surely a mistake
        raise ValueError(f"Invalid label value {value!r} in {where}: expected a positive integer.")
    try:
        as_int = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"Invalid label value {value!r} in {where}: expected a positive integer.") from None
    if as_int <= 0:
        raise ValueError(
            f"Invalid label value {value!r} in {where}: label values must be >= 1 (0 is the background)."
        )
    return as_int


def _finish(pairs: list[tuple[int, str]], where: str) -> dict[int, str]:
    if not pairs:
        raise ValueError(f"No classes given in {where}.")
    seen_values: dict[int, str] = {}
    seen_names: dict[str, int] = {}
    for value, name in pairs:
        if value in seen_values:
            raise ValueError(
                f"Label value {value} is given twice in {where} ({seen_values[value]!r} and {name!r})."
            )
        if name in seen_names:
            raise ValueError(f"Class name {name!r} is given twice in {where} (values {seen_names[name]} and {value}).")
        seen_values[value] = name
        seen_names[name] = value
    return dict(sorted(seen_values.items()))


def parse_classes(spec: str | Mapping) -> dict[int, str]:
    """Turn a class specification into ``{label_value: name}`` sorted by label value.

    ``spec`` is one of
      * ``"btcv8"`` (the 8 organs of the paper's Table 1) or ``"btcv13"`` (all BTCV organs), case-insensitive;
      * a ``"NAME=VALUE,NAME=VALUE"`` list, e.g. ``"spleen=1,liver=6"``;
      * a mapping ``{value: name}`` (values may be strings of digits, as in a metrics.json ``"classes"``)
        or ``{name: value}`` (as in an nnU-Net ``dataset.json`` ``"labels"``; a ``"background"`` entry with
        value 0 is dropped).

    Raises ValueError naming the offending token for unknown presets, malformed items, non-positive or
    repeated values and repeated names.
    """
    if isinstance(spec, Mapping):
        where = "the class mapping"
        pairs: list[tuple[int, str]] = []
        for key, val in spec.items():
            key_is_value = isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())
            if key_is_value:
                pairs.append((_check_value(key, where), _check_name(val, where)))
            else:
                if str(key).lower() == "background" and str(val).strip() == "0":
                    continue
                pairs.append((_check_value(val, where), _check_name(key, where)))
        return _finish(pairs, where)

    if not isinstance(spec, str):
        raise ValueError(f"Classes must be a preset name, a 'NAME=VALUE,...' string or a mapping; got {spec!r}.")
    text = spec.strip()
    if text.lower() in PRESETS:
        return dict(PRESETS[text.lower()])
    if "=" not in text:
        raise ValueError(
            f"Unknown class preset {text!r}: use one of {sorted(PRESETS)} or a 'NAME=VALUE,...' list "
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
        pairs.append((_check_value(value, at), _check_name(name, at)))
    return _finish(pairs, where)
