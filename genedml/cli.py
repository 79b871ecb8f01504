"""What train.py's and evaluate.py's command lines share: the help formatter and the flags' value checks.

A numeric flag is checked when it is parsed, so a bad value is a usage error (exit 2) that names the
flag, before any slide is read: `--epochs -1` or `--tau 0` never start a run.
"""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default; a default of None is explained in the flag's own help instead."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)
