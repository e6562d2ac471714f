"""Subcommands of `megarl`; see megarl/cli.py for the contract each module follows."""
