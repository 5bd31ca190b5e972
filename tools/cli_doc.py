"""Write the README's CLI option tables from the argparse parser, so they cannot drift from it.

    python tools/cli_doc.py           # print the tables
    python tools/cli_doc.py --write   # replace them in README.md between the cli-options markers
    python tools/cli_doc.py --check   # exit 1 if README.md is out of date

tests/test_cli_help.py fails when the README's tables differ from what this prints.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- cli-options:begin (tools/cli_doc.py --write) -->", "<!-- cli-options:end -->"


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for act in ap._actions:
        if isinstance(act, argparse._SubParsersAction):
            return dict(act.choices)
    return {}


def _cell(s: str) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def _flag(a: argparse.Action) -> str:
    if not a.option_strings:
        return f"`{a.dest.upper()}`"
    metavar = " {" + ",".join(map(str, a.choices)) + "}" if a.choices else ""
    if a.nargs == "+":
        metavar += " ..."
    return "`" + ", ".join(a.option_strings) + metavar + "`"


def _default(a: argparse.Action) -> str:
    if not a.option_strings:
        return "required"
    if a.required:
        return "required"
    if a.nargs == 0:  # store_true flags
        return "off"
    if a.default is None:
        return "-"
    return f"`{a.default}`"


GROUPED = "preprocessing:"  # options whose help starts so share one row


def _key(a: argparse.Action) -> tuple:
    return (tuple(a.option_strings), a.dest, a.help, repr(a.default), a.nargs)


def render(ap: argparse.ArgumentParser) -> str:
    """One Markdown table per subcommand; options already listed for an earlier subcommand are named, not repeated."""
    out, seen = [], {}
    for name, p in _subparsers(ap).items():
        acts = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
        shared = {}
        for a in acts:
            if a.option_strings and _key(a) in seen:
                shared.setdefault(seen[_key(a)], []).append(a)
        shared = {k: v for k, v in shared.items() if len(v) >= 3}  # a lone --force is clearer repeated
        rows = [a for a in acts if not any(a in v for v in shared.values())]
        out.append(f"`mptq-onnx {name}`: {_cell(p.description or dict(_help_lines(ap)).get(name, ''))}\n")
        out.append("| argument | default | what it does |")
        out.append("|---|---|---|")
        grouped = [a for a in rows if (a.help or "").startswith(GROUPED)]
        for a in rows:
            if a in grouped:  # the preprocessing flags: one row
                if a is grouped[0]:
                    out.append(f"| {', '.join(_flag(g) for g in grouped)} | - | {_cell(a.help or '')} "
                               f"({'; '.join(_cell((g.help or '')[len(GROUPED):].strip()) for g in grouped[1:])}) |")
                continue
            out.append(f"| {_flag(a)} | {_default(a)} | {_cell(a.help or '')} |")
        for other, same in shared.items():
            out.append(f"| and the {len(same)} options of `{other}` | | "
                       + ", ".join(f"`{a.option_strings[-1]}`" for a in same) + " |")
        out.append("")
        for a in acts:
            seen.setdefault(_key(a), name)
    return "\n".join(out).rstrip() + "\n"


def _help_lines(ap: argparse.ArgumentParser):
    """(subcommand, its one-line help) from the subparsers action."""
    for act in ap._actions:
        if isinstance(act, argparse._SubParsersAction):
            for ch in act._choices_actions:
                yield ch.dest, ch.help or ""


def splice(text: str, tables: str) -> str:
    """`text` with what lies between the markers replaced by `tables`."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{tables}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="update README.md in place")
    g.add_argument("--check", action="store_true", help="exit 1 if README.md's tables are out of date")
    ap.add_argument("--readme", default=str(REPO / "README.md"), help="file holding the markers (default README.md)")
    a = ap.parse_args(argv)
    from mptq_onnx.cli import build_parser
    tables = render(build_parser())
    if not (a.write or a.check):
        print(tables, end="")
        return 0
    path = Path(a.readme)
    old = path.read_text()
    new = splice(old, tables)
    if a.check:
        if new != old:
            print(f"{path} is out of date: run python tools/cli_doc.py --write", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new)
        print(f"updated {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
