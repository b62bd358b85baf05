"""
BLAKE2b digests, keyed or not: 16 bytes for where a key lands on the ring and for the MAC of a copy-stream
frame, 8 for a key's anti-entropy bucket.

On PyPy, ``hashlib.blake2b`` is a Python class over a cffi module: building the object and its parameter block,
then copying the state to take the digest, cost more than hashing a key or a small frame. There, a digest
function calls the same C functions directly, from a state set up once (with the key's block already taken in,
for a keyed digest) and copied for each message. Everywhere else, and if the direct calls ever disagree with
``hashlib``, it is ``hashlib``.
"""

from functools import partial
from hashlib import blake2b
from typing import Callable, Optional

from .privateapi import pypy_blake2b_direct

_BLOCK = 128
#: BLAKE2b's longest key.
MAX_KEY = 64


def blake2b16(key: bytes = b"") -> Callable[[bytes], bytes]:
    """
    A function giving ``hashlib.blake2b(message, digest_size=16, key=key).digest()`` of its one argument.
    Each function keeps its own state for the direct calls: call it from one thread (the reactor's).

    :param key: at most :data:`MAX_KEY` bytes; none for a plain digest.
    """
    return blake2b_digest(16, key)


def blake2b_digest(size: int, key: bytes = b"") -> Callable[[bytes], bytes]:
    """
    :func:`blake2b16`, for digests of ``size`` bytes (1 to 64).
    """
    if len(key) > MAX_KEY:
        raise ValueError("a BLAKE2b key is at most %d bytes" % (MAX_KEY,))
    if not 1 <= size <= 64:
        raise ValueError("a BLAKE2b digest is 1 to 64 bytes")
    return _direct(key, size) or partial(_hashlib_digest, size=size, key=key)


def _hashlib_digest(data: bytes, size: int = 16, key: bytes = b"") -> bytes:
    return blake2b(data, digest_size=size, key=key).digest()


def _direct(key: bytes, digest_size: int = 16) -> Optional[Callable[[bytes], bytes]]:
    """
    The digest through PyPy's direct BLAKE2b calls, or ``None`` where they are missing (CPython's ``blake2b``
    is C already), fail, or give other digests than ``hashlib``.
    """
    try:
        digest = pypy_blake2b_direct(key, digest_size, _BLOCK)
    except Exception:
        return None
    if digest is None:
        return None
    samples = (b"", b"k", "user:42/\u00e9".encode("utf-8"), bytes(range(256)) * 3)
    try:
        if all(digest(sample) == _hashlib_digest(sample, digest_size, key) for sample in samples):
            return digest
    except Exception:
        pass
    return None
