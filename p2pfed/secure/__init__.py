"""Secure averaging: a receiver learns only the weighted sum of its present senders'
adapters, never one of them, even when it lies about who is present, holds a message it
refused, or a round is redone. Fixed point, session-bound masks, Shamir-shared self
masks and the phases of one exchange each live in their own module."""

from p2pfed.secure.fixedpoint import MODULUS_BITS, FixedPoint, SecureError
from p2pfed.secure.keystream import prg_words
from p2pfed.secure.masks import PairwiseMasks, self_mask
from p2pfed.secure.protocol import ABSTAIN, CONSENT, CONSENTS, RELEASE, SECURE_CODEC, SURVIVORS, Neighbourhood, SecureCost
from p2pfed.secure.session import Context, Purpose, establish_session
from p2pfed.secure.topology_check import check_secure_topology

__all__ = ["ABSTAIN", "CONSENT", "CONSENTS", "MODULUS_BITS", "RELEASE", "SECURE_CODEC", "SURVIVORS", "Context", "FixedPoint",
           "Neighbourhood", "PairwiseMasks", "Purpose", "SecureCost", "SecureError", "check_secure_topology",
           "establish_session", "prg_words", "self_mask"]
