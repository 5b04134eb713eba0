"""DKIM: sign mail at intake (sign.py) with keys loaded at start (keys.py).

Input: the [[dkim]] identities of the configuration and, per message, its
bytes and envelope sender.  Output: the DKIM-Signature fields to prepend.
"""

from relay.dkim.keys import generate, load_private_key, public_key_txt
from relay.dkim.sign import DEFAULT_HEADERS, Signer

__all__ = ["DEFAULT_HEADERS", "Signer", "generate", "load_private_key", "public_key_txt"]
