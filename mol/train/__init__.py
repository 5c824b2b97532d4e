"""Hydra + Lightning training for mol adapters: ``python -m mol.train`` (see ``mol.train.app``)."""

from mol.train.app import main, run

__all__ = ["main", "run"]
