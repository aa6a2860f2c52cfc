"""Dataclass configs <-> command-line flags and YAML files.

A config is a dataclass whose fields carry their help text and help section in ``metadata``. The
same dataclass feeds argparse (``--batch_size``; ``--batch-size`` and aliases such as ``--lr``
work too but are not listed), YAML presets (``--config``) and the Python API; precedence is
dataclass default < YAML file < flags given on the command line.

Why argparse and not jsonargparse: the configs are already plain dataclasses with help text, and
this module turns them into flags in about a hundred lines; jsonargparse would add a dependency
(and its import time) to every ``dartsnas`` start, whose budget is well under a second. Its error
messages are multi-line and its own; here every bad flag or value becomes one line we word
ourselves (``dartsnas: error: ...``). And the saved run directories, the YAML presets and the
protocol's ``--search.epochs`` flags all read these same dataclasses, so mending the layer kept
every stored run and preset valid without a translation step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T")

# Help sections, in the order --help shows them; a field names one in its ``group``.
SECTIONS: dict[str, str] = {
    "data": "data",
    "network": "network",
    "optimisation": "optimisation",
    "regularisation": "regularisation",
    "search": "architecture search",
    "evaluation": "evaluation",
    "speed": "speed and memory",
    "distributed": "several processes (torchrun)",
    "runtime": "runtime",
    "output": "output",
    "options": "options",
}


def option(default: Any, help: str, *, group: str = "options", choices: typing.Sequence[Any] | None = None,
           aliases: typing.Sequence[str] = (), cli: bool = True) -> Any:
    """A config field with its help text and help section (and, optionally, the allowed values and
    extra flag names)."""
    if group not in SECTIONS:
        raise ValueError(f"unknown help section {group!r}")
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                                         "aliases": tuple(aliases), "cli": cli})


def redefault(cls: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``cls`` with another default: a subclass's settings keep their help."""
    return dataclasses.field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_KIND_WORDS = {int: "an integer", float: "a number"}

# A list of names (``tuple[str, ...]``): comma-separated on the command line, a YAML list or that same text in a file.
NAMES = tuple[str, ...]


def split_names(value: Any) -> Any:
    """``"a,b"`` or ``["a", "b"]`` as ``("a", "b")``; anything else unchanged (the settings' checks name it)."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",")) if value.strip() else ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return value


def _parse_value(kind: type, optional: bool, name: str) -> Any:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be {_KIND_WORDS.get(kind, kind.__name__)} "
                                             f"(got {text!r})") from None

    parse.__name__ = kind.__name__
    return parse


def _default_text(help_text: str, default: Any) -> str:
    # Help that already says its default ("default: all") keeps its own words; None says nothing.
    if "default" in help_text or default is None or default is dataclasses.MISSING:
        return ""
    if isinstance(default, bool):
        return " (default: on)" if default else " (default: off)"
    return f" (default: {default})"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                         defaults: Mapping[str, Any] | None = None, skip: Iterable[str] = (),
                         listed: bool = True) -> None:
    """Add one flag per field of ``cls``, under its help section; flags not given stay absent from
    the namespace.

    ``prefix`` names the flags ``--PREFIX.NAME`` (also ``--PREFIX-NAME``) with that dest, for
    settings nested in a larger command; ``defaults`` replaces field defaults in the help;
    ``skip`` leaves fields out; ``listed=False`` accepts the flags without listing them in --help.
    """
    hints = typing.get_type_hints(cls)
    skipped = set(skip)
    used = {f.metadata.get("group", "options") for f in dataclasses.fields(cls)}
    # Sections in SECTIONS order, whatever the order of the fields.
    sections = {name: _section(parser, title) for name, title in SECTIONS.items() if name in used}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skipped:
            continue
        kind, optional = _base_type(hints[f.name])
        dest = f"{prefix}.{f.name}" if prefix else f.name
        dashed = f.name.replace("_", "-")
        spellings = [f"--{dest}", f"--{prefix}.{dashed}", f"--{prefix}-{dashed}"] if prefix else [
            f"--{f.name}", f"--{dashed}", *meta.get("aliases", ())]
        names = list(dict.fromkeys(spellings))
        section = meta.get("group", "options")
        default = (defaults or {}).get(f.name, f.default)
        help_text = ((meta.get("help") or "") + _default_text(meta.get("help") or "", default)).replace("%", "%%")
        common = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text if listed else argparse.SUPPRESS}
        if kind is bool:
            action = sections[section].add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        elif kind == NAMES:
            action = sections[section].add_argument(*names, type=split_names, metavar="A,B,...", **common)
        else:
            choices = meta.get("choices")
            action = sections[section].add_argument(*names, type=_parse_value(kind, optional, dest), choices=choices,
                                                    metavar=None if choices else f.name.upper(), **common)
        # --help lists the first spelling only; the others are accepted all the same.
        action.listed_names = names[:1]  # type: ignore[attr-defined]


def _section(parser: argparse.ArgumentParser, title: str) -> Any:
    """The parser's argument group called ``title`` (created on first use, so sections stay unique)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def explicit_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user actually gave on the command line."""
    names = field_names(cls)
    return {k: v for k, v in vars(args).items() if k in names}


PRESET_PACKAGE = "dartsnas.presets"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


MAX_YAML_BYTES = 1_000_000


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error lines about values read from files."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _SettingsLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a few hundred bytes of nested aliases expand into
    gigabytes ("billion laughs"), and settings never need them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a settings file",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_yaml_mapping(path: str | os.PathLike[str], example: str = "batch_size: 64") -> tuple[dict[str, Any], str]:
    """Read a YAML file (or a shipped preset by name) that must map names to values.

    Returns the mapping and how to name its source in error messages.
    """
    text_path = str(path)
    if not os.path.exists(text_path) and text_path in list_presets():
        text = resources.files(PRESET_PACKAGE).joinpath(text_path + ".yaml").read_text(encoding="utf-8")
        where = f"preset {text_path}"
    elif not os.path.isfile(text_path):
        raise UserError(f"config file {text_path} does not exist; shipped presets: {', '.join(list_presets())}")
    else:
        where = text_path
        try:
            if os.path.getsize(text_path) > MAX_YAML_BYTES:
                raise UserError(f"{where} is larger than {MAX_YAML_BYTES // 1000} kB; a settings file is a few lines")
            text = Path(text_path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where} is not UTF-8 text; a settings file is YAML text") from None
        except OSError as exc:
            raise UserError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_SettingsLoader) or {}
    except (yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"{where} is not valid YAML: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} must map option names to values, e.g. '{example}'")
    return data, where


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def field_name(key: Any) -> str:
    """The field an option name means: YAML keys and flags may spell ``init_channels`` as ``init-channels``."""
    return str(key).replace("-", "_")


def read_yaml_config(path: str | os.PathLike[str], cls: type) -> dict[str, Any]:
    """Read a YAML config file (or a shipped preset by name) and check its keys against ``cls``."""
    data, where = load_yaml_mapping(path)
    names = field_names(cls)
    out = {}
    for key, value in data.items():
        norm = field_name(key)
        if norm not in names:
            raise UserError(f"{where}: unknown option {short(key)}; see --help for the valid names")
        out[norm] = value
    return out


def coerce(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check value types of YAML-provided options (ints where ints are expected, and so on)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        kind, optional = _base_type(hints[key])
        if value is None and optional:
            out[key] = None
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind == NAMES:
            value = split_names(value)
            if not isinstance(value, tuple):
                raise UserError(f"{where}: option {key!r} must be a list of names, got {short(value)}")
        if kind in (int, float, str, bool) and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
            raise UserError(f"{where}: option {key!r} must be {kind.__name__}, got {short(value)}")
        out[key] = value
    return out


def make_config(cls: type[T], args: argparse.Namespace | None = None, config_file: str | None = None, *,
                base: Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from defaults, then ``base`` (a command's own starting values), then a YAML file,
    then command-line flags, then ``overrides``."""
    values: dict[str, Any] = dict(base or {})
    if config_file:
        values.update(coerce(cls, read_yaml_config(config_file, cls), str(config_file)))
    if args is not None:
        values.update(explicit_args(cls, args))
    values.update(overrides)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML/JSON values (lists of names as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config saved in a run directory, ignoring keys a newer version no longer has."""
    names = field_names(cls)
    return cls(**{k: v for k, v in data.items() if k in names})


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
