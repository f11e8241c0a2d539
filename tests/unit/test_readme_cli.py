"""The README's CLI reference matches the CLI exactly: every command and every option of
`gpulab --help` (walked through click's command tree) is in the reference table, and every
command and option the table names exists. Add a command or an option: document it here."""

from __future__ import annotations

import re
from pathlib import Path

import click

from cli.main import main

README = Path(__file__).resolve().parent.parent.parent / "README.md"
_OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
_COMMAND = re.compile(r"`gpulab((?: [a-z][a-z-]*)*)")


def reference_rows() -> list[str]:
    """The first cells of the CLI reference table (continuation rows `  ...` included)."""
    text = README.read_text()
    section = text[text.index("## CLI reference") :]
    section = section[: section.index("\n## ", 1)]
    table = section[section.index("| command |") :].split("\n\n", 1)[0]
    return [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]


def cli_commands() -> dict[str, click.Command]:
    """Every command path ("", "submit", "node drain", ...) and its command."""
    found: dict[str, click.Command] = {}

    def walk(path: str, command: click.Command) -> None:
        found[path] = command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(f"{path} {name}".strip(), sub)

    walk("", main)
    return found


def options_of(command: click.Command) -> set[str]:
    """The spellings a user types: --mem, -f/--follow, --requeue/--no-requeue; not --help."""
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names |= {n for n in (*param.opts, *param.secondary_opts) if n.startswith("--")}
    return names - {"--help"}


def rows_by_command() -> dict[str, str]:
    """Each command path -> the text of every row naming it, with its `  ...` continuations."""
    out: dict[str, str] = {}
    current: list[str] = []
    for cell in reference_rows():
        if cell.startswith("`  ..."):
            for path in current:
                out[path] += " " + cell
            continue
        current = [m.strip() for m in _COMMAND.findall(cell)]
        for path in current:
            out[path] = out.get(path, "") + " " + cell
    return out


def _words(path: str, commands: dict[str, click.Command]) -> str:
    """The longest real command path at the start of `path` (`gpulab hold ID` -> hold)."""
    parts = path.split()
    while parts and " ".join(parts) not in commands:
        parts.pop()
    return " ".join(parts)


def test_every_command_and_option_is_in_the_readme() -> None:
    commands, rows = cli_commands(), rows_by_command()
    documented = {_words(p, commands) for p in rows}
    missing = [f"gpulab {p}".strip() for p in commands if p not in documented and not _is_group_only(commands[p])]
    assert not missing, f"commands missing from the README's CLI reference: {missing}"
    undocumented = []
    for path, command in commands.items():
        text = " ".join(t for p, t in rows.items() if _words(p, commands) == path)
        if "[submit options]" in text:  # `train ... [submit options]`: the options it shares with submit
            text += " " + " ".join(options_of(commands["submit"]))
        undocumented += [f"gpulab {path} {o}".replace("  ", " ") for o in sorted(options_of(command)) if o not in text]
    assert not undocumented, f"options missing from the README's CLI reference: {undocumented}"


def test_every_documented_command_and_option_exists() -> None:
    commands, rows = cli_commands(), rows_by_command()
    unknown_commands = [p for p in rows if p.split()[:1] and _words(p, commands) == "" and p]
    assert not unknown_commands, f"the README documents commands the CLI lacks: {unknown_commands}"
    unknown = []
    for path, text in rows.items():
        command = commands[_words(path, commands)]
        known = options_of(command) | {"--help"} | (options_of(main) if command is main else set())
        if isinstance(command, click.Group):  # a group's row may list its subcommands' options
            known |= {o for sub in command.commands.values() for o in options_of(sub)}
        # A row names several commands (`hold ... / release ...`): an option of any of them.
        siblings = [commands[_words(p, commands)] for p, t in rows.items() if t == text]
        known |= {o for c in siblings for o in options_of(c)}
        unknown += [f"gpulab {path}: {o}" for o in _OPTION.findall(text) if o.startswith("--") and o not in known]
    assert not unknown, f"the README documents options the CLI lacks: {unknown}"


def _is_group_only(command: click.Command) -> bool:
    """A group with no options of its own (`gpulab node`) is documented through its subcommands."""
    return isinstance(command, click.Group) and not options_of(command)


READ_COMMANDS = ("queue", "show", "logs", "wait", "gpus", "history", "top", "doctor", "cancel", "hold", "release")


def test_read_commands_take_json() -> None:
    commands = cli_commands()
    lacking = [name for name in READ_COMMANDS if "--json" not in options_of(commands[name])]
    assert not lacking, f"read commands without --json: {lacking}"
