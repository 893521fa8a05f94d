"""Simulation: every peer in one process on one shared, frozen base model, through the same
Peer, Averager, codecs, envelopes and secure mode as a torchrun run (`p2pfed simulate`)."""

from p2pfed.simulate.baton import Baton
from p2pfed.simulate.engine import simulate

__all__ = ["Baton", "simulate"]
