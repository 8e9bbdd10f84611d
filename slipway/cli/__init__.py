"""The ``slipway`` command line. Sub-commands import their heavy dependencies lazily, so ``--help`` is fast."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from slipway.cli import (
    canary_cmds,
    eval_cmds,
    governance_cmds,
    keys_cmds,
    llm_cmds,
    pipeline_cmds,
    provider_cmds,
    registry_cmds,
    rollout_cmds,
    serve_cmds,
)

app = typer.Typer(
    name="slipway",
    help="Fine-tune, gate, canary and promote LLMs — declared in YAML, run by Prefect, recorded in a registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
registry_cmds.register(app)
eval_cmds.register(app)
rollout_cmds.register(app)
canary_cmds.register(app)
pipeline_cmds.register(app)
llm_cmds.register(app)
serve_cmds.register(app)
keys_cmds.register(app)
governance_cmds.register(app)
provider_cmds.register(app)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user mistakes become one line on stderr and exit code 2, never a traceback."""
    # Typer vendors click; its exceptions are those of typer's own copy.
    from typer._click import exceptions as click

    from slipway.errors import SlipwayError

    command = typer.main.get_command(app)
    try:
        rv = command.main(list(argv) if argv is not None else sys.argv[1:], prog_name="slipway", standalone_mode=False)
    except click.UsageError as e:
        where = f"{e.ctx.command_path}: " if e.ctx else ""
        _fail(f"{where}{e.format_message()}")
        return 2
    except click.ClickException as e:
        _fail(e.format_message())
        return e.exit_code
    except typer.Abort:
        _fail("aborted")
        return 130
    except SlipwayError as e:
        _fail(str(e))
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    return rv if isinstance(rv, int) else 0


def _fail(message: str) -> None:
    sys.stderr.write(f"slipway: error: {' '.join(message.split())}\n")


def entrypoint() -> None:
    sys.exit(main())
