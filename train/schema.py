"""The typed-section machinery under recipes: YAML reading (1e-4 is a float) and writing, value
checks that name the key (`train.lr must be a number`), and `Section`, the base of every recipe
section (types, choices, bounds, then its own `validate`)."""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass
from typing import ClassVar, Iterable, Union, get_args, get_origin, get_type_hints

import yaml

from draftsmith.errors import DraftsmithError


class Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.2), not the string YAML 1.1 makes it."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


class Dumper(yaml.SafeDumper):
    """SafeDumper writing sections as blocks and lists inline (`layers_from_target: [0, 10]`)."""


Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def parse_yaml(text: str, where: str) -> object:
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise DraftsmithError(f"{where} is not valid YAML", str(e).replace("\n", " "),
                              "Fix the YAML syntax") from None


# ---------------------------------------------------------------- type checks

def describe(hint) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        inner = next(a for a in get_args(hint) if a is not type(None))
        return f"{describe(inner)} or null"
    if get_origin(hint) is list:
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural[get_args(hint)[0]]}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping"}[hint]


def coerce(value, hint, key: str):
    """`value` checked against `hint`; ints become floats for float fields. Raises naming `key`."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
        origin = get_origin(hint)
    elif value is None:
        raise DraftsmithError(f"{key} cannot be null", fix=f"Set {key} to {describe(hint)}")
    if origin is list:
        if isinstance(value, list):
            return [coerce(v, get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, hint):
        return value
    raise DraftsmithError(f"{key} must be {describe(hint)}", value,
                          f"Set {key} to {describe(hint)} in the recipe, or override it with {key}=VALUE")


def check(ok: bool, key: str, value, fix: str) -> None:
    if not ok:
        raise DraftsmithError(f"invalid {key}", value, fix)


def check_choice(key: str, value, choices: Iterable[str]) -> None:
    choices = list(choices)
    check(value in choices, key, value, f"Use one of: {', '.join(choices)}")


@dataclass
class Section:
    """Base of the recipe sections: checks types, then the bounds declared below, then validate()."""

    section: ClassVar[str] = ""
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    at_least: ClassVar[dict[str, float]] = {}
    """field -> lowest allowed value (null passes: for Optional fields it means off / default)."""
    above: ClassVar[dict[str, float]] = {}
    """field -> bound the value must exceed (null passes)."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f"{self.section}.{f.name}"))
        for name, allowed in self.choices.items():
            check_choice(f"{self.section}.{name}", getattr(self, name), allowed)
        for bounds, ok, word in ((self.at_least, float.__ge__, ">="), (self.above, float.__gt__, ">")):
            for name, low in bounds.items():
                value = getattr(self, name)
                off = ", or null for off" if get_origin(hints[name]) in (Union, types.UnionType) else ""
                check(value is None or ok(float(value), float(low)), f"{self.section}.{name}", value,
                      f"Use a value {word} {low}{off}")
        self.validate()

    def validate(self) -> None:
        """Checks beyond types, choices and bounds; raise DraftsmithError naming `section.key`."""


def unknown_key(where: str, key: object, valid: Iterable[str]) -> DraftsmithError:
    return DraftsmithError(f"unknown key in {where}", key, f"Valid keys: {', '.join(valid)}")


def section_from_dict(cls: type[Section], name: str, values: object) -> Section:
    """Section `name` of a recipe from its YAML mapping: unknown keys fail with the valid ones listed,
    required keys must be present, then the section checks its values."""
    if not isinstance(values, dict):
        raise DraftsmithError(f"{name} must be a mapping of keys", values,
                              f"Write `{name}:` followed by indented `key: value` lines")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            raise unknown_key(f"section {name}", key, valid)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise DraftsmithError(f"{name}.{f.name} is required", fix=f"Add `{f.name}:` under `{name}:`")
    return cls(**values)


def apply_override(raw: dict, override: str, sections: dict[str, type[Section]]) -> None:
    """Set `section.key=value` (value read as YAML) in the raw recipe mapping `raw`; `sections` maps
    section names to their classes."""
    if "=" not in override:
        raise DraftsmithError("an override needs the form section.key=value", override,
                              "e.g. train.lr=1e-4 or run.name=null")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    value = parse_yaml(text, f"the value of override {key.strip()}")
    if parts == ["description"]:
        raw["description"] = value
        return
    if len(parts) != 2 or parts[0] not in sections:
        raise DraftsmithError("an override must name section.key", override,
                              f"Sections: {', '.join(sections)}")
    section, name = parts
    valid = [f.name for f in dataclasses.fields(sections[section])]
    if name not in valid:
        raise unknown_key(f"override of section {section}", name, valid)
    if raw.get(section) is None:
        raw[section] = {}
    if isinstance(raw[section], dict):  # otherwise loading reports the malformed section
        raw[section][name] = value
