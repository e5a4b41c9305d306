"""`--help` renders for the program and every command (argparse %-formats help strings: a bare '%' crashed
`textcraftor-fast --help` once)."""
import pytest

from textcraftor_fast import cli

COMMANDS = ["train", "evaluate", "generate", "export", "demo"]


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: textcraftor-fast")
    if argv == ["--help"]:
        assert all(c in out for c in COMMANDS)
