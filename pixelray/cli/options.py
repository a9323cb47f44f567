"""Command-line options made from typed configs, so that a setting's type, bounds, choices, default and
help are declared once, in its config:

    CAPTION = ConfigOptions(CaptionConfig, positional=("input",), flags={"generation.max_new_tokens": "max-tokens"})
    CAPTION.add_to(parser)            # --batch-size, --device {auto,cpu,cuda,mps}, --stop (repeatable), ...
    cfg = CAPTION.build(args)         # a validated CaptionConfig from the options given

Every field with a description becomes an option (`batch_size` -> `--batch-size`); a field that holds
a config of its own (CaptionConfig.generation) gives its fields as options too. A bool is a switch, a
Literal a choice, a list a repeatable option. An option not given is left out, so the config's own
default applies.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterable
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def _bare(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else annotation
    return annotation


class ConfigOptions:
    def __init__(self, model: type[BaseModel], positional: Iterable[str] = (), flags: dict[str, str] | None = None,
                 only: Iterable[str] | None = None):
        self.model, self.positional, self.renamed = model, tuple(positional), flags or {}
        self.only = set(only) if only is not None else None
        self.flags: dict[str, str] = {}  # field path -> how the user wrote it (for error messages)

    def _fields(self, model: type[BaseModel], prefix: str = ""):
        for name, field in model.model_fields.items():
            kind = _bare(field.annotation)
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from self._fields(kind, f"{prefix}{name}.")
            elif field.description is not None and (self.only is None or prefix + name in self.only):
                yield prefix + name, field, kind

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        for path, field, kind in self._fields(self.model):
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            shown = "" if default is None or default is False or default == [] else f" (default: {default})"
            if path in self.positional:
                parser.add_argument(path, nargs=None if field.is_required() else "?", metavar=path.upper(),
                                    help=field.description + shown)
                self.flags[path] = path.upper()
                continue
            name = self.renamed.get(path, path.rsplit(".", 1)[-1])
            flag = "--" + name.replace("_", "-")
            options: dict[str, Any] = {"dest": path, "default": None, "help": field.description + shown}
            if field.is_required():
                options["required"] = True
            if kind is bool:
                options["action"] = "store_true"
            elif get_origin(kind) is Literal:
                options["choices"] = get_args(kind)
            elif get_origin(kind) is list:
                options.update(action="append", type=get_args(kind)[0], help=options["help"] + " (repeatable)")
            else:
                options["type"] = kind
            if "type" in options:  # (a choice shows its choices)
                options["metavar"] = name.replace("-", "_").upper()
            parser.add_argument(flag, **options)
            self.flags[path] = flag

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """The options given on the command line, as the config's (nested) fields."""
        values: dict[str, Any] = {}
        for path in self.flags:
            value = getattr(args, path, None)
            if value is None:
                continue
            *parents, name = path.split(".")
            node = values
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = value
        return values

    def build(self, args: argparse.Namespace) -> BaseModel:
        return self.model.model_validate(self.given(args))
