"""Write the table of ``CAMSERVE_*`` variables in docs/configuration.md from ``app/settings.py``.

Usage (from the repository root)::

    .venv/bin/python tools/settings_doc.py           # rewrite the table in the page
    .venv/bin/python tools/settings_doc.py --check   # exit 1 when the page is out of date

Each row comes from one field of ``Settings``: the variable from the field's name, the default,
what is allowed (from the field's type and bounds, or its ``allowed`` schema extra where a
validator decides) and the meaning (the field's description). ``tests/tools/test_settings_doc.py``
fails when the page and the settings disagree.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.settings import ENV_PREFIX, Settings  # noqa: E402

PAGE = REPO / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN settings table: written by tools/settings_doc.py from app/settings.py -->"
END = "<!-- END settings table -->"


def _number(value: float) -> str:
    """A bound as people read it: 1000000 -> 1,000,000; 5.0 -> 5."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if abs(value) >= 100_000 else str(value)


def _plain(value: Any) -> str:
    """A default as it would be written in the environment."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return f"`{','.join(map(str, value))}`" if value else "empty"
    if field.default is None or field.default is PydanticUndefined:
        return "unset"
    return f"`{_plain(field.default)}`"


def _types(annotation: Any) -> tuple[list[Any], bool]:
    """The annotation's types without ``None``, and whether ``None`` (an empty value) is allowed."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = list(typing.get_args(annotation))
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _bounds(field: FieldInfo) -> str:
    """``1 to 32``, ``over 0 to 600``, ``at least 1``, ``up to 5``, or ``a number``."""
    low = high = alone = ""
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = _number(item.ge)  # type: ignore[arg-type]
            alone = f"at least {low}"
        elif isinstance(item, annotated_types.Gt):
            low = alone = f"over {_number(item.gt)}"  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            high = _number(item.le)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Lt):
            high = f"under {_number(item.lt)}"  # type: ignore[arg-type]
    if low and high:
        return f"{low} to {high}"
    return alone or (f"up to {high}" if high else "a number")


def _allowed(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    kinds, optional = _types(field.annotation)
    if isinstance(extra, dict) and "allowed" in extra:
        allowed = str(extra["allowed"])
    elif typing.get_origin(kinds[0]) is Literal:
        allowed = ", ".join(f"`{v}`" for v in typing.get_args(kinds[0]))
    elif kinds[0] is bool:
        allowed = "`true`, `false`"
    elif kinds[0] in (int, float):
        allowed = _bounds(field)
    elif typing.get_origin(kinds[0]) is list:
        allowed = "a list"
    elif kinds[0] is Path:
        allowed = "a folder"
    elif kinds[0] is SecretStr:
        allowed = "any string"
    else:
        allowed = "a string"
    return f"{allowed}, or empty" if optional else allowed


def _variables(name: str, field: FieldInfo) -> str:
    """The variable, and the older names still read (an ``AliasChoices`` lists the current name
    first: pydantic-settings reads an alias as the whole variable name, without the prefix)."""
    alias = field.validation_alias
    if isinstance(alias, str):
        return f"`{alias.upper()}`"
    if isinstance(alias, AliasChoices):
        names = [choice.upper() for choice in alias.choices if isinstance(choice, str)]
        if names:
            older = ", ".join(f"`{n}`" for n in names[1:])
            return f"`{names[0]}`" + (f" (formerly {older})" if older else "")
    return f"`{ENV_PREFIX}{name.upper()}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_table() -> str:
    """The Markdown table of every setting, in the order of the Settings class."""
    lines = ["| Variable | Default | Allowed | Meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        cells = (
            _variables(name, field),
            _default(field),
            _allowed(field),
            field.description or "",
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render(page: str) -> str:
    """The page with the text between its BEGIN and END markers replaced by the table."""
    try:
        head, rest = page.split(BEGIN + "\n", 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"{PAGE}: the markers {BEGIN!r} and {END!r} are missing") from None
    return f"{head}{BEGIN}\n{settings_table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether it is current")
    args = parser.parse_args(argv)
    page = PAGE.read_text(encoding="utf-8")
    wanted = render(page)
    if args.check:
        if wanted != page:
            print(f"{PAGE} is out of date: run .venv/bin/python tools/settings_doc.py")
            return 1
        return 0
    if wanted != page:
        PAGE.write_text(wanted, encoding="utf-8")
        print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
