"""`${NAME}` and `${NAME:-default}` in a config file's string values, from the environment.

Owns the substitution rule, applied to the YAML document's values (never its keys)
before either validation pass, so every check sees the final values:

- `${NAME}` is the variable's value; unset, it is a located error
  (``upstreams.users.targets[0]: environment variable USERS_URL is not set``);
- `${NAME:-default}` is the value, or `default` when the variable is unset or empty
  (the shell's rule); the default is literal text up to the first `}`;
- only upper-case names (`[A-Z_][A-Z0-9_]*`) are variables: every other `${...}`, such
  as a WebSocket API's `${request.body.action}` or a `${stageVariables.x}` template, is
  kept as written; `${NAME:...}` with anything but `:-` is an error, not kept, so a
  mistyped default never passes silently;
- `$${` is a literal `${` (`$${HOME}` stays `${HOME}`), and nothing else is an escape;
- a plain (unquoted) scalar is typed after substitution as YAML types the text written
  there: `workers: ${WORKERS:-2}` is the integer 2, `verify: ${VERIFY}` a boolean; only
  null, booleans and numbers are produced this way (a value never becomes a list or a
  mapping); a quoted scalar stays a string.

Substituted text is never substituted again (a value containing `${X}` stays as it is).
A config given as a dict is not substituted: it is taken as built, which also makes
`Config.raw` (already substituted) safe to load again, as workers do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

Path = tuple[Any, ...]

# `$${`, or `${NAME}`, `${NAME:-default}`, `${NAME:anything}` (the last one refused).
_TOKEN = re.compile(r"\$\$\{|\$\{([A-Z_][A-Z0-9_]*)(?:(:-)([^}]*)|(:[^}]*))?\}")
_TYPED = {"tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
          "tag:yaml.org,2002:float"}
_RESOLVER = yaml.resolver.Resolver()


def substitute(value: Any, env: Mapping[str, str], plain: set[Path],
               fail: Callable[[Path, str], None], path: Path = ()) -> Any:
    """`value` with every variable of its strings replaced (a new structure; `value`
    is not changed). `plain`: the paths of plain scalars (`yamlstrict.DocIndex.plain`).
    Each problem goes to `fail(path, message)`; the string is then kept as written."""
    if isinstance(value, dict):
        return {k: substitute(v, env, plain, fail, path + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env, plain, fail, path + (i,)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    problems: list[str] = []

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1)
        if m.group(4) is not None:
            problems.append(f"{m.group(0)!r}: write ${{{name}}} or ${{{name}:-default}}")
            return m.group(0)
        got = env.get(name)
        if m.group(2):  # ${NAME:-default}
            return got if got else m.group(3)
        if got is None:
            problems.append(f"environment variable {name} is not set")
            return m.group(0)
        return got

    out = _TOKEN.sub(one, value)
    for msg in dict.fromkeys(problems):
        fail(path, msg)
    if problems:
        return value
    return _typed(out) if path in plain else out


def _typed(text: str) -> Any:
    """`text` as YAML reads a plain scalar: null, a boolean, a number, else the string."""
    tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))
    if tag not in _TYPED:
        return text
    return yaml.safe_load(text)
