"""
:mod:`kvresponder.digest`: BLAKE2b digests of 16 bytes, keyed or not, the same whichever way they are computed.
"""

import sys
import types
from hashlib import blake2b
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from kvresponder import digest
from kvresponder.digest import MAX_KEY, blake2b16, blake2b_digest

# On CPython the digest functions are hashlib's, so the two comparisons below hold by construction there; they
# test the direct calls on PyPy, where CI runs the suite too.

@given(st.binary(max_size=2000), st.binary(max_size=MAX_KEY))
@settings(max_examples=300, deadline=None)
def test_a_digest_is_hashlibs_blake2b_whichever_way_it_is_computed(data, key):
    """
    If a message is digested, with a key or without, the way this interpreter does it (PyPy calls the BLAKE2b C
    functions directly), then it is byte for byte ``hashlib.blake2b(digest_size=16, key=key)``: nodes on
    either interpreter place keys alike and check each other's frames.
    """
    assert blake2b16(key)(data) == blake2b(data, digest_size=16, key=key).digest()


@given(st.binary(max_size=300), st.sampled_from([1, 8, 16, 32, 64]), st.binary(max_size=MAX_KEY))
@settings(max_examples=200, deadline=None)
def test_a_digest_of_any_size_is_hashlibs_blake2b_of_that_size(data, size, key):
    """
    If a digest of another size is asked for (8 bytes: a key's anti-entropy bucket), then it is byte for byte
    ``hashlib.blake2b(digest_size=size)``, not a cut of a longer digest: nodes of older versions, which hash
    with hashlib, find the same buckets.
    """
    assert blake2b_digest(size, key)(data) == blake2b(data, digest_size=size, key=key).digest()


def test_a_digest_size_blake2b_does_not_give_is_refused():
    for size in (0, 65):
        with pytest.raises(ValueError):
            blake2b_digest(size)


def test_one_function_gives_the_same_digest_again_and_keys_do_not_mix():
    """
    If one keyed function digests many messages in turn, then each digest is the message's alone (the state
    is set up again for each), and another key gives another digest.
    """
    first, second = blake2b16(b"k" * 32), blake2b16(b"j" * 32)
    digests = [first(b"frame %d" % (i,)) for i in range(3)]
    assert [first(b"frame %d" % (i,)) for i in range(3)] == digests
    assert second(b"frame 0") != digests[0]
    assert blake2b16()(b"frame 0") != digests[0]


def test_a_key_longer_than_blake2b_takes_is_refused():
    with pytest.raises(ValueError):
        blake2b16(b"k" * (MAX_KEY + 1))


@pytest.mark.skipif(sys.implementation.name != "pypy", reason="the direct BLAKE2b calls exist on PyPy only")
def test_pypy_digests_without_hashlibs_wrapper():
    """
    If the node runs on PyPy, then digests go through the direct calls, keyed or not, not ``hashlib``'s Python
    class (half the cost of hashing a key there).
    """
    assert digest._direct(b"") is not None
    assert digest._direct(b"k" * 32) is not None
    assert digest._direct(b"", 8) is not None


def _fake_blake2(monkeypatch, init=lambda state, param: 0):
    """Stand-ins for PyPy's ``_blake2._blake2b_cffi`` whose C calls hash nothing."""
    ffi = SimpleNamespace(new=lambda kind, size=None: bytearray(size) if size else SimpleNamespace(),
                          unpack=lambda out, size: bytes(out[:size]), sizeof=lambda kind: 0,
                          memmove=lambda dest, src, size: None)
    lib = SimpleNamespace(blake_init_param=init, blake_update=lambda state, data, size: None,
                          blake_final=lambda state, out, size: None)
    package = types.ModuleType("_blake2")
    module = types.ModuleType("_blake2._blake2b_cffi")
    module.ffi, module.lib = ffi, lib
    package._blake2b_cffi = module
    monkeypatch.setitem(sys.modules, "_blake2", package)
    monkeypatch.setitem(sys.modules, "_blake2._blake2b_cffi", module)


@pytest.mark.parametrize("key", [b"", b"k" * 32])
def test_direct_calls_that_disagree_with_hashlib_are_not_used(monkeypatch, key):
    """
    If the direct BLAKE2b calls give other digests than ``hashlib`` (a PyPy whose module differs), then they
    are not taken, and ``hashlib`` digests.
    """
    _fake_blake2(monkeypatch)
    assert digest._direct(key) is None
    assert blake2b16(key)(b"m") == blake2b(b"m", digest_size=16, key=key).digest()


def test_direct_calls_that_fail_are_not_used(monkeypatch):
    def refuse(state, param):
        raise TypeError("no such parameter block")
    _fake_blake2(monkeypatch, init=refuse)
    assert digest._direct(b"k") is None
