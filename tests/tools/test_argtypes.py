import argparse

import pytest

from cropr.tools.argtypes import DefaultsHelpFormatter, parse_shares


def _help_text(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_help().split())  # wrapping removed


def test_defaults_help_formatter_shows_only_defaults_that_say_something():
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    parser.add_argument("--rate", type=int, help="tokens removed (default: the source's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="continue")
    parser.add_argument("--size", type=int, default=224, help="side of the image, %(default)s by default")
    text = _help_text(parser)
    assert "passes over the data (default: 1.0)" in text
    assert "tokens removed (default: the source's)" in text
    assert "no progress bar --resume" in text and "continue" in text
    assert "side of the image, 224 by default" in text
    for unsaid in ("(default: None)", "(default: False)", "(default: True)", "(default: 224)"):
        assert unsaid not in text


def test_calibrate_help_shows_its_defaults(capsys):
    from cropr.calibration import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "images per step (default: 32)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_shares_are_comma_separated_numbers_from_zero_to_one():
    assert parse_shares("0, 0.5,1") == [0.0, 0.5, 1.0]
    for text in ("", "0,1.5", "-0.1", "half", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="shares in"):
            parse_shares(text)
