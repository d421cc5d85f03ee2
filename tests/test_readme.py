"""The README's two commands exist, and the main command's CLI invocation parses."""

import pathlib
import re
import shlex

from editing_jax import cli

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def _command_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", README)
    assert match, f"README has no {marker} block"
    return match.group(1)


def test_readme_opens_with_the_two_commands():
    main, test = _command_after("main-command"), _command_after("test-command")
    assert README.index("main-command") < README.index("test-command") < README.index("## ")
    for command in (main, test):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e ")
    assert "pytest" in test


def test_main_command_cli_invocation_parses():
    cli_part = _command_after("main-command").split("&& editing-jax ", 1)[1]
    argv, overrides = cli.config_lib.split_config_overrides(shlex.split(cli_part))
    args = cli.build_parser().parse_args(argv)
    assert args.handler is not None and not overrides
