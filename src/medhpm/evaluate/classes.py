"""Class (organ) definitions for evaluation: BTCV label values, the protocol's reported subset, parsing.

A class set is a ``dict[int, str]`` from label value to organ name (snake_case), ordered by label value.
The BTCV tables come from :mod:`medhpm.data.labels`, the package's one BTCV label table.
"""

from __future__ import annotations

import re
from typing import Mapping

from medhpm.config import check_class_name, check_label_value, class_table, parse_class_list
from medhpm.data.labels import BTCV13, BTCV_LABELS, PROTOCOL_ORGANS


# The 8 organs the paper's Table 1 reports (TransUNet's protocol), see docs/reproduce_btcv.md.
BTCV8: dict[int, str] = {v: BTCV13[v] for v in PROTOCOL_ORGANS}

# The classes of the presets that medhpm.config.CLASS_PRESETS names (the syntax of a class string is
# medhpm.config.parse_class_list, so that a config's finetune.reported is checked before any data is read).
PRESETS: dict[str, dict[int, str]] = {"btcv8": BTCV8, "btcv13": BTCV13}  # the keys: config.CLASS_PRESETS

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


def display_name(name: str) -> str:
    """Table header for an organ name: ``"right_kidney"`` -> ``"Kidney(R)"``, ``"left_lung"`` -> ``"Left Lung"``."""
    if name in DISPLAY_NAMES:
        return DISPLAY_NAMES[name]
    return " ".join(part.capitalize() for part in re.split(r"[_\-]+", name) if part)


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
                pairs.append((check_label_value(key, where), check_class_name(val, where)))
            else:
                if str(key).lower() == "background" and str(val).strip() == "0":
                    continue
                pairs.append((check_label_value(val, where), check_class_name(key, where)))
        return class_table(pairs, where)

    if not isinstance(spec, str):
        raise ValueError(f"Classes must be a preset name, a 'NAME=VALUE,...' string or a mapping; got {spec!r}.")
    parsed = parse_class_list(spec)
    return dict(PRESETS[parsed]) if isinstance(parsed, str) else parsed


def value_name(value: int) -> str:
    """The name of a label value that has none: ``class_<value>`` (as fine-tuning names unnamed classes)."""
    return f"class_{int(value)}"


def classes_from_labels(labels: Mapping[int, str]) -> dict[int, str]:
    """Evaluation class names from a datalist's or dataset.json's ``labels`` (``{value: name}``; the
    background, value 0, is dropped) or a colour table's names.

    A BTCV organ at its BTCV value keeps its BTCV class name (``2: "right kidney"`` -> ``right_kidney``, so
    Table-1 headers stay the paper's); any other name becomes a valid class name (runs of characters other
    than letters, digits, ``_`` and ``-`` become ``_``; a name that does not start with a letter, or
    repeats one, is named by value: ``class_<value>``).
    """
    out: dict[int, str] = {}
    for v, raw in sorted((int(k), str(n)) for k, n in labels.items()):
        if v <= 0:
            continue
        spoken = re.sub(r"[_\s]+", " ", raw).strip().lower()
        if BTCV_LABELS.get(v) == spoken or BTCV13.get(v) == raw:
            name = BTCV13[v]
        else:
            name = re.sub(r"[^A-Za-z0-9_-]+", "_", raw.strip()).strip("_")
            if not re.match(r"[A-Za-z]", name) or name in out.values():
                name = value_name(v)
        out[v] = name
    return out
