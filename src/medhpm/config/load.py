"""Loading a config: code defaults -> YAML file (a packaged name or a path) -> ``key=value`` overrides,
with unknown keys and wrong types named (and the closest existing key suggested)."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, cast

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medhpm.config.schema import Config, ConfigError
from medhpm.config.upgrade import _reject_old_keys, _upgrade
from medhpm.config.validate import compile_mode, validate


def packaged_configs(folder: str = "") -> list[str]:
    """Names of the YAML configs shipped inside the package (``folder="experiments"``: the experiment specs)."""
    root = _packaged(folder)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _packaged(folder: str = ""):
    root = resources.files("medhpm") / "configs"
    return root / folder if folder else root


def read_yaml(name_or_path: str, folder: str = "", what: str = "config") -> tuple[dict, str]:
    """The mapping in a YAML file: a path, or the name of one packaged under ``medhpm/configs/FOLDER``.

    Returns the mapping and where it came from (for messages); ``what`` names the kind of file in them.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {name_or_path!r} does not exist")
        text, where = path.read_text(), str(path)
    else:
        res = _packaged(folder) / f"{name_or_path}.yaml"
        if not res.is_file():
            names = packaged_configs(folder)
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"no packaged {what} named {name_or_path!r} (packaged: {', '.join(names)})."
                f"{hint} Give a path to a .yaml file to use your own."
            )
        text, where = res.read_text(), f"packaged {what} {name_or_path!r}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, not {type(data).__name__}")
    return data, where


def _known_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.extend(_known_keys(type(default), full + "."))
    return keys


def _suggest(key: str) -> str:
    keys = _known_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # compare the last part too: "pretrain.lamda_pred" -> "pretrain.lambda_pred"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[m[0]]] if m else []
    return f" Did you mean {close[0]!r}?" if close else ""


def _leaves(data: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's values (an empty section counts as one)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _merge(base, other, where: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        if not key:  # a tuple of the wrong length is reported without its key: find it leaf by leaf
            key = _failing_key(base, other)
        if "not in struct" in msg or "Key '" in msg and "not" in msg:
            raise ConfigError(f"unknown config key {key!r} in {where}.{_suggest(key)}") from None
        n = re.match(r"TupleConfig length (\d+) does not match type hint length (\d+)", msg)
        if n:
            msg = f"must hold {n.group(2)} values, not {n.group(1)}"
        raise ConfigError(f"bad value for config key {key!r} in {where}: {msg}") from None


def _failing_key(base, other) -> str:
    """The dotted key of ``other`` whose merge into ``base`` fails ("" if none does alone)."""
    data = OmegaConf.to_container(other)
    for key in _leaves(data) if isinstance(data, dict) else []:
        value: Any = data
        for part in key.split("."):
            value = value[part]
        try:
            OmegaConf.merge(base, _nested(key, value))
        except OmegaConfBaseException:
            return key
    return ""


def _nested(key: str, value: Any):
    for part in reversed(key.split(".")):
        value = {part: value}
    return OmegaConf.create(value)


def load_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Resolve a config: defaults, then the YAML (packaged name or path), then ``key=value`` overrides."""
    data, where = read_yaml(name_or_path) if name_or_path else ({}, "")
    return _resolve(data, where, overrides)


def _resolve(data: dict, where: str, overrides: Optional[Sequence[str]]) -> Config:
    """Defaults, then the mapping ``data`` (read from ``where``), then ``key=value`` overrides; validated."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    if data:
        _reject_old_keys(_leaves(data), where)
        cfg = _merge(cfg, OmegaConf.create(data), where)
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value (e.g. pretrain.epochs=10)")
            key = item.split("=", 1)[0]
            # Short forms that users type most: method=hpm -> pretrain.method=hpm
            if key in _SHORTCUTS:
                item = _SHORTCUTS[key] + item[len(key) :]
            _reject_old_keys([item.split("=", 1)[0]], f"command-line override {item!r}")
            cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command-line override {item!r}")
    obj = cast(Config, OmegaConf.to_object(cfg))
    validate(obj)
    return obj


_SHORTCUTS = {"method": "pretrain.method", "seed": "seed", "preset": "model.preset", "roi": "data.roi"}


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """The config stored in a checkpoint (or run folder); one written by an earlier version is read in
    today's key names."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    cfg = _merge(cfg, OmegaConf.create(_upgrade(data)), "stored config")
    obj = cast(Config, OmegaConf.to_object(cfg))
    obj.runtime.compile = compile_mode(obj.runtime.compile)  # the old switch
    return obj
