"""Config ergonomics: file paths relative to the config file, `${VAR}` values, `-c -`,
errors with line, column and route key, one error per mistake, `validate --format json`.

Real files in tmp_path, the real CLI as a subprocess, or `load_config`; no mocks.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from edgeplane.config.loader import ConfigError, load_config, load_config_text
from edgeplane.http.tls import write_dev_cert


def run_cli(*args: str, cwd: Path, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeplane", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd, input=stdin, env={**os.environ, **(env or {})})


def refused(path_or_text: Path | str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        if isinstance(path_or_text, Path):
            load_config(path_or_text, **kw)
        else:
            load_config_text(path_or_text, **kw)
    return exc.value


# -- file paths ------------------------------------------------------------------------------

def _jwks() -> str:
    k = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    return json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(k.x), "y": b64(k.y), "kid": "k1"}]})


PATHS_YAML = """\
listen: "127.0.0.1:0"
data_dir: state
admin:
  listen: "127.0.0.1:0"
  auth: {token_file: secrets/admin.token, mtls: true}
  tls: {cert: certs/dev.pem, key: certs/dev-key.pem, client_ca: certs/dev.pem}
tls:
  listen: "127.0.0.1:0"
  certificates:
    - {cert: certs/dev.pem, key: ./certs/dev-key.pem}
  client_ca: certs/../certs/dev.pem
upstreams:
  billing:
    targets: ["https://127.0.0.1:9443"]
    tls: {ca_file: certs/dev.pem}
authorizers:
  partners: {type: api_key, keys_file: secrets/keys.yaml}
  users: {type: jwt, issuer: "https://auth.example/", audience: api, algorithms: [ES256],
          jwks: {file: secrets/jwks.json}}
  hmac: {type: jwt, issuer: "https://auth.example/", audience: api, algorithms: [HS256],
         hs_secret: {file: secrets/hs.key}}
access_log: {destination: file, path: logs/access.log}
routes:
  - route: "GET /a"
    auth: partners
    integration: {type: mock}
"""


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    """A config folder with every kind of file a config names, and an unrelated cwd."""
    conf = tmp_path / "etc" / "edgeplane"
    write_dev_cert(str(conf / "certs"), ["localhost", "127.0.0.1"])
    secrets = conf / "secrets"
    secrets.mkdir()
    (secrets / "admin.token").write_text("a" * 40 + "\n")
    (secrets / "admin.token").chmod(0o600)
    (secrets / "keys.yaml").write_text("keys: []\n")
    (secrets / "jwks.json").write_text(_jwks())
    (secrets / "hs.key").write_text("k" * 64)
    (conf / "gw.yaml").write_text(PATHS_YAML)
    (tmp_path / "elsewhere").mkdir()
    return conf


def test_relative_paths_resolve_against_the_config_folder(conf_dir: Path, monkeypatch):
    elsewhere = conf_dir.parents[1] / "elsewhere"
    res = run_cli("validate", "-c", str(conf_dir / "gw.yaml"), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert "OK (1 routes, 1 upstreams)" in res.stdout

    monkeypatch.chdir(elsewhere)
    cfg = load_config(conf_dir / "gw.yaml")
    d = str(conf_dir)
    assert cfg.data_dir == f"{d}/state"
    assert cfg.admin.tls is not None and cfg.admin.tls.certificates[0].cert == f"{d}/certs/dev.pem"
    assert cfg.admin.tls.client_ca == f"{d}/certs/dev.pem"
    assert cfg.tls is not None and cfg.tls.certificates[0].key == f"{d}/certs/dev-key.pem"
    assert cfg.tls.client_ca == f"{d}/certs/dev.pem"  # normalised: certs/../certs/
    assert cfg.upstreams["billing"].tls.ca_file == f"{d}/certs/dev.pem"
    assert cfg.authorizers["partners"].keys_file == f"{d}/secrets/keys.yaml"
    assert cfg.authorizers["users"].jwks_file == f"{d}/secrets/jwks.json"
    assert cfg.authorizers["hmac"].hs_secret_file == f"{d}/secrets/hs.key"
    assert cfg.access_log.path == f"{d}/logs/access.log"
    assert cfg.admin.token == b"a" * 40
    # Config.raw names the files absolutely: a worker loads it as a dict from anywhere.
    assert cfg.raw["authorizers"]["users"]["jwks"]["file"] == f"{d}/secrets/jwks.json"
    monkeypatch.chdir("/")
    again = load_config(cfg.raw)
    assert again.admin.token == cfg.admin.token and again.tls == cfg.tls and again.data_dir == cfg.data_dir


def test_text_from_stdin_resolves_against_the_current_directory(conf_dir: Path):
    text = (conf_dir / "gw.yaml").read_text()
    ok = run_cli("validate", "-c", "-", cwd=conf_dir, stdin=text)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("<stdin>: OK (1 routes, 1 upstreams)")
    # The same text from another folder names files that are not there, every one of them.
    res = run_cli("validate", "-c", "-", cwd=conf_dir.parents[1] / "elsewhere", stdin=text)
    assert res.returncode == 1
    for where in ("admin.auth.token_file", "tls.certificates[0]", "upstreams.billing.tls.ca_file",
                  "authorizers.partners.keys_file", "authorizers.users.jwks.file",
                  "authorizers.hmac.hs_secret.file"):
        assert f": {where}: " in res.stderr, (where, res.stderr)
    assert res.stderr.count("<stdin>:") >= 6


def test_a_dict_keeps_paths_relative_to_the_current_directory(conf_dir: Path, monkeypatch):
    raw = yaml.safe_load(PATHS_YAML)
    monkeypatch.chdir(conf_dir)
    cfg = load_config(raw)
    assert cfg.data_dir == "state" and cfg.authorizers["partners"].keys_file == "secrets/keys.yaml"
    assert raw == yaml.safe_load(PATHS_YAML)  # the caller's dict is not rewritten
    monkeypatch.chdir(conf_dir.parent)
    with pytest.raises(ConfigError) as exc:
        load_config(raw)
    assert "authorizers.partners.keys_file: (file): key file not found: secrets/keys.yaml" in exc.value.errors


# -- ${VAR} substitution ---------------------------------------------------------------------

ENV_YAML = """\
listen: ${LISTEN:-127.0.0.1:0}
workers: ${WORKERS:-2}
log_level: ${LOG_LEVEL:-warning}
drain_timeout: "${DRAIN}"
upstreams:
  users:
    targets:
      - ${USERS_URL}
      - "http://${ALT_HOST}:9002"
websocket_apis:
  chat:
    path: /chat
    route_selection: "${request.body.service}/${request.body.action}"
    routes:
      "svc/send": {integration: {type: http, upstream: users}}
routes:
  - route: "GET /lit"
    integration:
      type: mock
      body: "$${NOT_A_VAR} and ${lower.case} and $${request.body.x}"
  - route: "GET /echo"
    integration:
      type: mock
      body: ${ECHO}
"""


def test_variables_are_substituted_and_plain_values_typed(monkeypatch):
    monkeypatch.setenv("USERS_URL", "http://127.0.0.1:9001")
    monkeypatch.setenv("ALT_HOST", "10.0.0.2")
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("DRAIN", "12")
    monkeypatch.setenv("LOG_LEVEL", "")  # empty: `:-` takes the default, as in the shell
    monkeypatch.setenv("ECHO", "${USERS_URL} is not expanded twice")
    monkeypatch.delenv("LISTEN", raising=False)
    cfg = load_config_text(ENV_YAML)
    assert cfg.workers == 3  # plain scalar: typed as YAML types "3"
    assert cfg.log_level == "warning"
    assert cfg.raw["drain_timeout"] == "12" and cfg.drain_timeout == 12.0  # quoted: stays a string
    assert [str(t) for t in cfg.upstreams["users"].targets] == ["http://127.0.0.1:9001", "http://10.0.0.2:9002"]
    assert cfg.websocket_apis["chat"].route_selection == "${request.body.service}/${request.body.action}"
    assert cfg.raw["routes"][0]["integration"]["body"] == (
        "${NOT_A_VAR} and ${lower.case} and ${request.body.x}")
    assert cfg.raw["routes"][1]["integration"]["body"] == "${USERS_URL} is not expanded twice"
    # Config.raw is substituted once and for all: loading it again changes nothing.
    assert load_config(cfg.raw).raw == cfg.raw


def test_an_unset_variable_is_one_located_error(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("USERS_URL", raising=False)
    monkeypatch.delenv("ALT_HOST", raising=False)
    monkeypatch.setenv("DRAIN", "1s")
    monkeypatch.setenv("ECHO", "x")
    path = tmp_path / "env.yaml"
    path.write_text(ENV_YAML)
    err = refused(path)
    # One error per value: not also "invalid target '${USERS_URL}'".
    assert err.errors == ["upstreams.users.targets[0]: environment variable USERS_URL is not set",
                          "upstreams.users.targets[1]: environment variable ALT_HOST is not set"]
    assert [(p.line, p.column) for p in err.entries] == [(8, 9), (9, 9)]
    res = run_cli("validate", "-c", str(path), cwd=tmp_path,
                  env={"DRAIN": "1s", "ECHO": "x", "USERS_URL": "http://127.0.0.1:1"})
    assert res.returncode == 1
    assert f"{path}:9:9: upstreams.users.targets[1]: environment variable ALT_HOST is not set" in res.stderr
    assert "USERS_URL" not in res.stderr  # set in the child's environment


def test_a_mistyped_default_is_an_error_not_kept():
    err = refused('listen: "${LISTEN:127.0.0.1:0}"\n')
    assert err.errors == ["listen: '${LISTEN:127.0.0.1:0}': write ${LISTEN} or ${LISTEN:-default}"]


def test_keys_are_never_substituted(monkeypatch):
    monkeypatch.setenv("NAME", "users")
    err = refused('listen: "127.0.0.1:0"\nupstreams:\n  ${NAME}: {targets: ["http://127.0.0.1:1"]}\n')
    assert err.errors[0].startswith("upstreams: invalid name '${NAME}'")


# -- located errors ------------------------------------------------------------------------

BAD_YAML = """\
listen: "127.0.0.1:0"
upstreams:
  users: {targets: ["http://127.0.0.1:9001"]}
authorizers:
  partners: {type: api_key, keys_file: keys.yaml}
usage_plans:
  gold:
    routes:
      "GET /b": {rate: 1, burst: 1}
routes:
  - route: "GET /a"
    integration: {type: http, upstream: users}
    throttle: {rate: "100/s", burst: 10}
  - route: "GET /b"
    integration: {type: http, upstream: users}
    auth: partnrs
    throttle: {rate: 100, burst: 10, key: $context.identity.apiKeyId}
  - route: "GET /users/{id}"
    integration:
      type: http
      upstream: userz
      timeout: 99h
      tiemout: 3
"""


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)
    return path


def test_one_mistake_gives_one_error(bad_file: Path):
    err = refused(bad_file)
    assert err.errors == [
        # not also "routes[0].throttle: rate must be a number of requests per second"
        "routes[0].throttle.rate: expected number, got string '100/s'",
        # not also "routes[1].throttle.key: ... never resolves here: the route has no api_key
        # authorizer", nor "usage_plans.gold.routes.GET /b: the route has no api_key authorizer"
        "routes[1].auth: unknown authorizer 'partnrs' (known: partners); did you mean 'partners'?",
        "routes[2].integration: unknown key 'tiemout', did you mean 'timeout'?",
        "routes[2].integration.timeout: must be <= 86400s, got '99h'",
        "routes[2].integration.upstream: unknown upstream 'userz' (known: users); did you mean 'users'?",
    ]


def test_errors_carry_line_column_and_the_route_key(bad_file: Path):
    err = refused(bad_file)
    got = [(p.where, p.line, p.column) for p in err.entries]
    assert got == [
        ("routes[0] (GET /a).throttle.rate", 13, 16),
        ("routes[1] (GET /b).auth", 16, 5),
        ("routes[2] (GET /users/{id}).integration", 23, 7),  # the unknown key's own line
        ("routes[2] (GET /users/{id}).integration.timeout", 22, 7),
        ("routes[2] (GET /users/{id}).integration.upstream", 21, 7),
    ]
    res = run_cli("validate", "-c", "bad.yaml", cwd=bad_file.parent)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0] == "bad.yaml: invalid configuration (5 errors):"
    assert "bad.yaml:22:7: routes[2] (GET /users/{id}).integration.timeout: must be <= 86400s, got '99h'" in lines
    assert len(lines) == 6


def test_independent_mistakes_are_all_listed(tmp_path: Path):
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    text = BAD_YAML.replace('auth: partnrs', 'auth: partners').replace(
        'throttle: {rate: "100/s", burst: 10}',
        'throttle: {rate: 5, burst: 5, key: $context.identity.apiKeyId}')
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    errors = refused(path).errors
    # routes[0]'s key check is not explained by routes[2]'s errors: it stays.
    assert "routes[0].throttle.key: $context.identity.apiKeyId never resolves here: the route has no " \
           "api_key authorizer" in errors
    assert len([e for e in errors if e.startswith("routes[2]")]) == 3


def test_syntax_errors_and_warnings_are_located_in_the_cli(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text('listen: "127.0.0.1:0"\nworkers: 1\nworkers: 2\n')
    res = run_cli("validate", "-c", "broken.yaml", cwd=tmp_path)
    assert res.returncode == 1
    assert "broken.yaml:3:1: YAML syntax error: duplicate key 'workers' (first defined on line 2)" in res.stderr
    res = run_cli("validate", "-c", "-", cwd=tmp_path, stdin='listen: "a\x01"\n')  # refused by the reader
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[1].startswith("<stdin>: YAML syntax error: unacceptable character #x0001")
    risky = tmp_path / "risky.yaml"
    risky.write_text('listen: "127.0.0.1:0"\nadmin:\n  listen: "0.0.0.0:0"\n  insecure: true\n')
    res = run_cli("validate", "-c", "risky.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("risky.yaml:4:3: warning: admin.insecure: the admin listener")


# -- validate --format json --------------------------------------------------------------------

def test_validate_json(bad_file: Path):
    res = run_cli("validate", "--format", "json", "-c", "bad.yaml", cwd=bad_file.parent)
    assert res.returncode == 1 and res.stderr == ""
    out = json.loads(res.stdout)
    assert out["ok"] is False and out["file"] == "bad.yaml" and out["warnings"] == []
    assert out["errors"][3] == {"location": "routes[2] (GET /users/{id}).integration.timeout",
                                "path": ["routes", 2, "integration", "timeout"], "line": 22, "column": 7,
                                "message": "must be <= 86400s, got '99h'"}
    assert len(out["errors"]) == 5

    good = 'listen: "127.0.0.1:0"\nadmin: {listen: "0.0.0.0:0", insecure: true}\n'
    res = run_cli("validate", "--format", "json", "-c", "-", cwd=bad_file.parent, stdin=good)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] is True and out["errors"] == [] and out["file"] == "<stdin>"
    assert [(w["location"], w["line"], w["column"]) for w in out["warnings"]] == [("admin.insecure", 2, 30)]

    res = run_cli("validate", "--format", "json", "-c", "-", cwd=bad_file.parent, stdin="listen: [\n")
    assert res.returncode == 1
    (error,) = json.loads(res.stdout)["errors"]
    assert error["line"] == 2 and error["message"].startswith("YAML syntax error:")
