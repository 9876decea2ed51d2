"""The one typed config reader: a dataclass config (aha train's `Config`, the pipeline, experiment,
finding, sample, SFT and pretrain configs) filled from YAML or command-line values, each coerced to its
field's type, an unknown or ill-typed key one line naming the key.

    apply_values(Config(), {"lr": "1e-5", "group_size": "16"}, "command line")
"""

import difflib
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from aha.infra.errors import AhaError


def coerce(key: str, raw, kind):
    """Parse a YAML/CLI value into the field's type, or a one-line error naming key and type. A string
    field keeps the text as given: `autocast=off` stays "off" (YAML 1.1 would read it as False)."""
    if kind is str and isinstance(raw, str):
        return raw
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            pass
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        raw = float(raw)
    if kind is float and isinstance(raw, str):         # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            raw = float(raw)
        except ValueError:
            pass
    if kind is str and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = str(raw)
    if kind is str and isinstance(raw, bool):
        raise AhaError(f"config: {key} expects str, got {raw!r} (YAML reads off/on/yes/no as booleans: "
                       f"quote the value, e.g. {key}: \"off\")")
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise AhaError(f"config: {key} expects {kind.__name__}, got {raw!r}")
    return raw




def apply_values(obj, values: dict, source: str):
    """The one typed config reader: set the dataclass fields of `obj` (Config, and the pipeline,
    experiment, finding, sample, SFT and pretrain configs) from a mapping of YAML or command-line values,
    each coerced to its field's type. A tuple field takes "25,100" or a list; a dict field whose
    metadata names a config class (`keys_of`) takes that class's keys, each checked and typed. An unknown
    key is an AhaError naming the nearest field (or the class's `ALIASES` entry)."""
    types = typing.get_type_hints(type(obj))
    known = {f.name: f for f in fields(obj)}
    for key, raw in values.items():
        if key not in known:
            aliases = getattr(type(obj), "ALIASES", {})
            near = [aliases[key]] if key in aliases else difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else getattr(type(obj), "HELP", "")
            raise AhaError(f"{source}: unknown config key {key!r}{hint}")
        kind = types[key]
        if "keys_of" in known[key].metadata:
            if isinstance(raw, str):                          # from the command line: rl="{lr: 1e-5}"
                try:
                    raw = yaml.safe_load(raw)
                except yaml.YAMLError:
                    pass
            if not isinstance(raw, dict):
                raise AhaError(f"{source}: {key} expects a mapping of aha train keys, got {raw!r}")
            typed = apply_values(known[key].metadata["keys_of"](), raw, f"{source}: {key}")   # each key known, typed
            setattr(obj, key, {name: getattr(typed, name) for name in raw})
        elif typing.get_origin(kind) is tuple:
            items = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(items, (list, tuple)) or not items:
                raise AhaError(f"{source}: {key} expects a list, e.g. 25,100; got {raw!r}")
            setattr(obj, key, tuple(coerce(key, item, typing.get_args(kind)[0]) for item in items))
        else:
            setattr(obj, key, coerce(key, raw, kind))
    return obj


def from_args(cls, args, source: str = "command line", **given):
    """A `cls` config from the argparse flags named as its fields (those given), then `given`."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return apply_values(cls(), values | given, source)


def parse_kv(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise AhaError(f"override {pair!r} is not key=value (e.g. lr=1e-5)")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def read_yaml_mapping(path: str) -> dict:
    """A YAML config file as a dict, or a one-line error saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise AhaError(f"config file {p} does not exist")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AhaError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise AhaError(f"config file {p} must be a mapping of key: value")
    return values
