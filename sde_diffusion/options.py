"""Named parts with options read from their signatures: the machinery behind every registry a user extends from
their own file (weightings and noise-level distributions of an objective, SDEs; samplers use `Option`, `coerce`
and `parse_options` too).

A part is a function (or a class, whose `__init__` is read) whose leading positional parameters are the
framework's arguments and whose keyword parameters with defaults are its options. A few more names may be the
framework's to fill (`passed`): the part declares them to receive them, and they are not options. Text specs
read `"name[:option=value,...]"`; values are converted to the type of the option's default, and an option
annotated `Literal[...]` only takes those values.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


@dataclass(frozen=True)
class Option:
    """One keyword option of a part: its default and, for Literal annotations, the allowed values."""

    name: str
    default: Any
    choices: Optional[Tuple[Any, ...]] = None

    def describe(self) -> str:
        allowed = f" ∈ {list(self.choices)}" if self.choices else ""
        return f"{self.name}={self.default!r}{allowed}"


def coerce(value: Any, default: Any) -> Any:
    """value as the type of `default` (text from a config string is converted); TypeError/ValueError if it is not."""
    if default is None:
        return guess_value(value) if isinstance(value, str) else value
    if isinstance(default, bool):
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        if isinstance(value, bool):
            return value
        raise TypeError("is not a boolean (true/false)")
    if isinstance(default, int):
        if isinstance(value, str):
            return _parse(int, value, "is not an integer")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("is not an integer")
    if isinstance(default, float):
        if isinstance(value, str):
            return _parse(float, value, "is not a number")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("is not a number")
    if isinstance(default, str):
        if isinstance(value, str):
            return value.strip()
        raise TypeError("is not a string")
    return value


def _parse(cast, text: str, message: str):
    try:
        return cast(text.strip())
    except ValueError:
        raise ValueError(message) from None


def guess_value(text: str):
    """'3' → 3, '0.5' → 0.5, 'true' → True, anything else stays text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_options(text: str, where: str = "options", expected: str = "'name[:option=value,...]'") -> Dict[str, str]:
    """'k=v,k2=v2' → {'k': 'v', 'k2': 'v2'} (values stay text until the part's signature converts them)."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{where}: option {item!r} is not key=value; expected {expected}")
        options[key.strip()] = value.strip()
    return options


def literal_choices(hint) -> Optional[Tuple[Any, ...]]:
    """The values of a `Literal[...]` annotation, else None."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


def type_hints(fn: Callable) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve: no choices, options still work
        return {}


def did_you_mean(value: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(names), n=1) if isinstance(value, str) else []
    return f"; did you mean {close[0]!r}?" if close else ""


def check_option(kind: str, name: str, options: Dict[str, Option], key: str, value: Any, hint: str = "") -> Any:
    """`value` of option `key` of the part `name` (a `kind`) converted to its default's type; ValueError naming the
    option and the valid ones (and `hint` for an unknown key)."""
    valid = ", ".join(o.describe() for o in options.values()) or "none"
    if key not in options:
        raise ValueError(f"{kind} {name!r} has no option {key!r}{did_you_mean(key, list(options))}; its options: "
                         f"{valid}{hint}")
    option = options[key]
    try:
        value = coerce(value, option.default)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{kind} {name!r}: option {key}={value!r} {err}; its options: {valid}") from None
    if option.choices is not None and value not in option.choices:
        raise ValueError(f"{kind} {name!r}: option {key}={value!r} is not one of {list(option.choices)}")
    return value


@dataclass(frozen=True)
class Part:
    """A registered part: `kind` ('weighting', …), `name`, the function or class, its options and the framework
    names it declares (`passed`)."""

    kind: str
    name: str
    fn: Callable
    options: Dict[str, Option]
    passed: Tuple[str, ...]

    def check_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        """options with text converted; ValueError naming the part, the option and the valid ones."""
        return {key: check_option(self.kind, self.name, self.options, key, value) for key, value in options.items()}

    def describe_options(self) -> str:
        return ", ".join(o.describe() for o in self.options.values()) or "none"

    def spec(self, options: Dict[str, Any]) -> str:
        """The text form 'name[:option=value,...]' of this part with `options`."""
        text = ",".join(f"{k}={v}" for k, v in options.items())
        return f"{self.name}:{text}" if text else self.name


class Registry:
    """Parts of one kind by name. `leading`: the names of the positional parameters every part starts with (the
    framework's arguments); `passed`: keyword names the framework fills when a part declares them; `how`: the
    decorator users register with (named in errors)."""

    def __init__(self, kind: str, leading: Sequence[str], passed: Sequence[str], how: str):
        self.kind, self.leading, self.passed, self.how = kind, tuple(leading), tuple(passed), how
        self.parts: Dict[str, Part] = {}

    def __contains__(self, name) -> bool:
        return name in self.parts

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __getitem__(self, name: str) -> Part:
        return self.get(name)

    def names(self) -> list:
        return sorted(self.parts)

    def register(self, name: str, *, replace: bool = False) -> Callable[[Callable], Callable]:
        """Decorator: register `fn` (or a class) as `name`; a taken name is a ValueError unless replace=True."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self.kind} name must be an identifier such as 'my_{self.kind}', got {name!r}")

        def decorate(fn: Callable) -> Callable:
            if name in self.parts and not replace and self.parts[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {_where(self.parts[name].fn)}); "
                                 f"pick another name or pass replace=True")
            self.parts[name] = self.part_from(name, fn)
            return fn

        return decorate

    def part_from(self, name: str, fn: Callable) -> Part:
        """Read the options from fn's signature (a class: its __init__'s); ValueError for one the framework cannot
        call."""
        signature = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
        params = list(signature.parameters.values())[1 if inspect.isclass(fn) else 0:]
        positional = [p.name for p in params[:len(self.leading)]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < len(self.leading):
            raise ValueError(f"{self.kind} {name!r}: the signature must start with ({', '.join(self.leading)}), got "
                             f"{signature}")
        hints = type_hints(fn.__init__ if inspect.isclass(fn) else fn)
        options, passed = {}, []
        for p in params[len(self.leading):]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ValueError(f"{self.kind} {name!r}: *{p.name}/**{p.name} cannot be checked; list each option as "
                                 "a keyword parameter with a default")
            if p.name in self.passed:
                passed.append(p.name)
            elif p.default is p.empty:
                raise ValueError(f"{self.kind} {name!r}: parameter {p.name!r} needs a default (options are keyword "
                                 f"parameters with defaults; the framework fills only {list(self.passed)})")
            else:
                options[p.name] = Option(p.name, p.default, literal_choices(hints.get(p.name)))
        return Part(self.kind, name, fn, options, tuple(passed))

    def get(self, name: str) -> Part:
        """The part `name`; ValueError naming the registered ones (and the closest) otherwise."""
        if name not in self.parts:
            raise ValueError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; available: "
                             f"{self.names()} (one of your own is registered with {self.how}; import its module in "
                             "your config file)")
        return self.parts[name]

    def parse(self, spec: str, where: Optional[str] = None) -> Tuple[Part, Dict[str, Any]]:
        """'name[:option=value,...]' → (part, checked options). ValueError naming `where` (e.g. the config key)."""
        name, _, text = str(spec).strip().partition(":")
        try:
            part = self.get(name.strip())
            return part, part.check_options(parse_options(text, f"{self.kind} {spec!r}"))
        except ValueError as err:
            raise ValueError(f"{where}={spec!r}: {err}" if where else str(err)) from None


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
