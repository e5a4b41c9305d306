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


def test_generate_and_evaluate_share_the_switch_step_default_and_say_it(capsys):
    from textcraftor_fast.evaluation import EvalOptions
    from textcraftor_fast.inference import GenerateOptions

    assert GenerateOptions().switch_step == EvalOptions().switch_step == 0  # the tuned encoder at every step
    for command in ("generate", "evaluate"):
        args = cli.build_parser().parse_args([command, "--config", "builtin:tiny"])
        assert cli._switch_step_arg(args) == 0
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "default 0: " in help_text and "a decimal a fraction of the steps, rounded down" in help_text
