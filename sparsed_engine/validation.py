"""Strict validation shared by the settings models: pydantic checks types and ranges, and its
errors become one ValueError/TypeError whose message names the field and the value given."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError


class InvalidValueError(ValueError):
    """A setting of the right type with a value outside what it allows."""


class InvalidTypeError(TypeError, ValueError):
    """A setting of the wrong type. Also a ValueError, so that one `except ValueError` (the CLI,
    the server's 400s) catches every bad input."""


def type_error(message: str) -> PydanticCustomError:
    """Raise this from a validator for a wrong type (pydantic lets only ValueError through)."""
    return PydanticCustomError("custom_type", message)


def _dict_or_none(v):
    if v is not None and not isinstance(v, dict):
        raise type_error("must be a dict or None")
    return v


# A settings dict (attention_config): a real dict or None, never a string or list coerced into one.
OptionalDict = Annotated[dict[str, Any] | None, BeforeValidator(_dict_or_none)]


def _is_type_error(kind: str) -> bool:
    return kind.endswith("_type") or kind in ("is_instance_of", "extra_forbidden", "union_tag_invalid")


def named_error(owner: str, exc: ValidationError, given: dict[str, Any]) -> Exception:
    """The first error of `exc` as `Owner.field=value: why` (the value as the caller gave it)."""
    err = exc.errors(include_url=False)[0]
    field = str(err["loc"][0]) if err["loc"] else None
    value = given.get(field, err.get("input")) if field else err.get("input")
    why = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":  # a value that is not one of the names: a value error
        return InvalidValueError(f"{owner}.{field}={value!r}: {why}")
    cls = InvalidTypeError if _is_type_error(err["type"]) else InvalidValueError
    where = f"{owner}.{field}={value!r}" if field else owner
    return cls(f"{where}: {why}")


class StrictModel(BaseModel):
    """A frozen, strict settings model: a bool is not an int, an int is not a str, floats are
    finite, unknown names are errors. Arguments may be given by position in field order; a bad
    one raises InvalidValueError / InvalidTypeError naming it (pydantic's ValidationError never
    escapes). The attribute docstrings become the CLI's help."""
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False,
                              arbitrary_types_allowed=True, use_attribute_docstrings=True,
                              validate_default=False)

    def __init__(self, *args, **kwargs):
        owner = type(self).__name__
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise InvalidTypeError(f"{owner} takes at most {len(names)} positional arguments, got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise InvalidTypeError(f"{owner} got two values for {name}")
            kwargs[name] = value
        try:
            super().__init__(**kwargs)
        except ValidationError as e:
            raise named_error(owner, e, kwargs) from None
        self.check()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable: make a new one with "
                             f".replace({name}=...), which validates it")

    def replace(self, **changes):
        """A validated copy with some fields changed."""
        return type(self)(**{**{n: getattr(self, n) for n in type(self).model_fields}, **changes})

    def check(self) -> None:
        """Rules across fields (subclasses); raise InvalidValueError naming a field."""

    def revalidated(self):
        """Validate the current field values again (a list changed in place, a model_copy with
        update=..., object.__setattr__): the same object when nothing is wrong."""
        self.replace()
        return self

    def bad(self, name: str, why: str) -> InvalidValueError:
        return InvalidValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}")
