"""The ROCA fingerprint of an RSA modulus (CVE-2017-15361), sans-IO.

Owns one question: does an RSA public modulus carry the structure of Infineon RSALib's
"fast prime" generator, whose keys can be factored from the public key alone?

RSALib made every prime as ``k * M + (65537**a mod M)`` with ``M`` a primorial, so a
modulus ``n = p * q`` is congruent to a power of 65537 modulo every small prime ``r`` that
divides ``M``: ``n mod r`` lies in the multiplicative subgroup that 65537 generates modulo
``r``. The fingerprint tests that for the primes 3..167 (the list of the original
``roca-detect`` tool by the paper's authors, CRoCS; 2 is left out because every odd modulus
passes it). For a random modulus all 38 tests pass with probability about 2**-27.8, so a
match means the key came from the broken generator; a miss means it did not.

Invariants:

- The subgroups are computed once, at import, from `FINGERPRINT_PRIMES` and `GENERATOR`
  (nothing is copied from elsewhere); each is a bit mask with bit ``x`` set when ``x`` is a
  power of the generator modulo that prime.
- `has_roca_fingerprint` does 38 small remainders and bit tests, no allocation beyond
  them, no I/O; it never raises for an ``int`` argument.
"""

from __future__ import annotations

__all__ = ["FINGERPRINT_PRIMES", "GENERATOR", "has_roca_fingerprint", "subgroup_mask"]

#: RSALib's prime generator: the primes are k*M + GENERATOR**a (mod M).
GENERATOR = 65537

#: The small primes whose residues the fingerprint examines (the published roca-detect list).
FINGERPRINT_PRIMES: tuple[int, ...] = (
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83,
    89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
)


def subgroup_mask(prime: int, generator: int = GENERATOR) -> int:
    """Bit mask of the subgroup `generator` spans in the integers modulo `prime`:
    bit ``x`` is set when ``x == generator**i mod prime`` for some ``i``."""
    g = generator % prime
    if g == 0:
        raise ValueError(f"{generator} is not invertible modulo {prime}")
    mask = 0
    power = 1
    while True:
        mask |= 1 << power
        power = power * g % prime
        if power == 1:
            return mask


# (prime, subgroup mask), computed once: the check itself is then a remainder and a bit test.
_SUBGROUPS: tuple[tuple[int, int], ...] = tuple((p, subgroup_mask(p)) for p in FINGERPRINT_PRIMES)


def has_roca_fingerprint(modulus: int) -> bool:
    """True when `modulus` carries the ROCA structure (CVE-2017-15361): its residue
    modulo each fingerprint prime is a power of 65537 there."""
    for prime, mask in _SUBGROUPS:
        if not (mask >> (modulus % prime)) & 1:
            return False
    return True
