"""docs/options.md, the option reference, written from the library's own tables.

The options common to every method come from :data:`fixedpoint.options.COMMON_OPTIONS` (name,
default, one line), the options of each built-in method from its dataclass fields (name and
default), the DEQ layer's own defaults from :data:`fixedpoint.torch.config.LAYER_DEFAULTS`, so
the page cannot disagree with the code::

    python -m tooling.doc_options           # rewrite docs/options.md
    python -m tooling.doc_options --check   # exit status 1 if docs/options.md differs

``tests/test_architecture.py`` runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import fixedpoint
from fixedpoint.options import COMMON_OPTIONS

__all__ = ["render", "PAGE", "main"]

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "options.md"

_HEAD = """# Option reference

<!-- Written by `python -m tooling.doc_options` from fixedpoint.options.COMMON_OPTIONS and the methods'
dataclass fields; edit those, not this page. -->

## Options of every method

{func}`fixedpoint.solve` and the shortcuts ({func}`fixedpoint.anderson`,
{func}`fixedpoint.forward_iteration`, {func}`fixedpoint.broyden`) take these keyword
arguments whatever the method; the DEQ layer ({class}`fixedpoint.torch.DEQ`) sets `tol`,
`max_iter`, `batch`, `compact` and `backend` itself (its own arguments, with its own defaults)
and passes the others on from `options`. Their full descriptions are in
{func}`fixedpoint.solve`'s docstring; the values are checked by the same functions everywhere
({data}`fixedpoint.COMMON_OPTIONS`).

| option | default | meaning |
|---|---|---|
"""

_METHODS_HEAD = """
## Options of each method

A method's own options are the fields of its class, given either to the class
(`fixedpoint.Anderson(m=10)`) or, with its registered name, to {func}`fixedpoint.solve`
(`solve(g, x0, method="anderson", m=10)`). Their meaning is documented in each class.

| method name | class | options (default) |
|---|---|---|
"""


_LAYER_HEAD = """
## The DEQ layer's own arguments

{class}`fixedpoint.torch.DEQ` and {func}`fixedpoint.torch.deq_fixed_point` share these
defaults; the layer's tolerance is the paper's 1e-2 (Al Dajani & Keyes) rather than
`solve`'s. Their meaning is in {func}`fixedpoint.torch.deq_fixed_point`'s docstring.

| argument | default |
|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def render() -> str:
    """The page's Markdown."""
    rows = [f"| `{o.name}` | `{_value(o.default)}` | {_cell(o.doc)} |" for o in COMMON_OPTIONS.values()]
    methods = []
    for name in ("anderson", "forward", "broyden"):
        cls = fixedpoint.METHODS[name]
        fields = ", ".join(f"`{f.name}` ({_value(f.default)})" for f in dataclasses.fields(cls))
        methods.append(f"| `{name}` | {{class}}`fixedpoint.{cls.__name__}` | {fields} |")
    from fixedpoint.torch.config import LAYER_DEFAULTS

    layer = [f"| `{name}` | `{_value(value)}` |" for name, value in LAYER_DEFAULTS.items()]
    return (_HEAD + "\n".join(rows) + "\n" + _METHODS_HEAD + "\n".join(methods) + "\n" + _LAYER_HEAD
            + "\n".join(layer) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tooling.doc_options", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit status 1 on a difference")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        same = PAGE.exists() and PAGE.read_text(encoding="utf-8") == text
        print(f"{PAGE}: {'up to date' if same else 'differs; run python -m tooling.doc_options'}")
        return 0 if same else 1
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
