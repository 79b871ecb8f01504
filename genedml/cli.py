"""What train.py's and evaluate.py's command lines share: the help formatter and the flags' value checks.

A numeric flag is checked when it is parsed, so a bad value is a usage error (exit 2) that names the
flag, before any slide is read: `--epochs -1` or `--tau 0` never start a run.
"""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default; a default of None is explained in the flag's own help instead."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def number(kind, low=None, above=None):
    """An argparse type: a number of `kind` (int or float) that is >= low, or > above.

    `type=number(int, low=1)` makes `--batch-size 0` the usage error "argument --batch-size: must be at
    least 1, got 0"; float("nan") and float("inf") are refused for a float."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def comma_list(text: str) -> list[str]:
    """An argparse type: a comma list of names ("A1,B1") as a list, without empty entries."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of names, got {text!r}")
    return names
