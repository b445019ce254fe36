"""Command-line flags generated from the EngineConfig and SamplingParams fields (type, default,
choices, help from the field's docstring), so every setting has a flag and none is listed twice.

Any subcommand reuses them: `add_engine_args(parser)` / `engine_kwargs_from_args(args)`, and the
same for sampling. Flags left out are not passed on, so the defaults live only in the models.
"""
from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any, Literal

from sparsed_engine.config import EngineConfig
from sparsed_engine.sampling_params import SamplingParams

# A SamplingParams field whose flag would clash with an EngineConfig one gets this prefix.
_SAMPLING_CLASH_PREFIX = "request-"
_SAMPLING_DEST = "sampling_"


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"skip\": 0.2}}', got {text!r}")
    return value


def _strip(annotation) -> list:
    """The alternatives of a (possibly Optional/Annotated) annotation, None and Annotated removed."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _strip(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _strip(arg)]
    return [] if annotation is type(None) else [annotation]


def _argparse_kwargs(info) -> dict[str, Any]:
    alts = _strip(info.annotation)
    extra = info.json_schema_extra or {}
    kind = alts[0] if alts else Any
    kw: dict[str, Any] = {}
    if "choices" in extra:
        kw.update(type=str, choices=list(extra["choices"]))
    elif typing.get_origin(kind) is Literal:
        kw.update(type=str, choices=list(typing.get_args(kind)))
    elif kind is bool:
        kw.update(action=argparse.BooleanOptionalAction)
    elif typing.get_origin(kind) is list:
        item = _strip(typing.get_args(kind)[0])[0]
        kw.update(type=item, action="append", metavar=item.__name__.upper())
    elif typing.get_origin(kind) is dict or kind is dict:
        kw.update(type=_json_object, metavar="JSON")
    elif kind in (int, float, str):
        kw.update(type=kind)
    else:
        raise TypeError(f"no command-line form for a field of type {info.annotation!r}")
    return kw


def _help(info) -> str:
    doc = " ".join((info.description or "").split())
    default = info.get_default(call_default_factory=True)
    if default in (None, [], False) or info.is_required():
        return doc
    return f"{doc} (default: {default})"


def _add(parser: argparse.ArgumentParser, model: type, dest_prefix: str, flag_prefix: dict[str, str],
         title: str) -> None:
    group = parser.add_argument_group(title)
    for name, info in model.model_fields.items():
        flag = "--" + flag_prefix.get(name, "") + name.replace("_", "-")
        kw = _argparse_kwargs(info)
        if "type" in kw and "choices" not in kw:
            kw.setdefault("metavar", name.upper())
        group.add_argument(flag, dest=dest_prefix + name, default=argparse.SUPPRESS, help=_help(info), **kw)


def _sampling_prefixes() -> dict[str, str]:
    return {name: _SAMPLING_CLASH_PREFIX for name in SamplingParams.model_fields
            if name in EngineConfig.model_fields}


def engine_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def sampling_flag(name: str) -> str:
    return "--" + _sampling_prefixes().get(name, "") + name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    _add(parser, EngineConfig, "", {}, "engine (LLM options)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    _add(parser, SamplingParams, _SAMPLING_DEST, _sampling_prefixes(), "sampling (SamplingParams)")


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields given on the command line (model absent: the bundled model)."""
    given = vars(args)
    return {name: given[name] for name in EngineConfig.model_fields if name in given}


def sampling_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    given = vars(args)
    return {name: given[_SAMPLING_DEST + name] for name in SamplingParams.model_fields
            if _SAMPLING_DEST + name in given}
