"""The core sections every gateway has: listeners, admin, TLS, upstreams, limits, logs.

Owns loading `listen`, `admin`, `tls`, `upstreams` (targets, pool, upstream TLS),
`limits`, `http.path_normalization`, `access_log` and `cluster` into their models, with every listener checked
against the others for collisions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

from edgeplane.config import model, resilience
from edgeplane.config.context import LoadContext, Path
from edgeplane.config.errors import describe as _describe
from edgeplane.config.errors import short as _short
from edgeplane.config.humanize import loc
from edgeplane.config.values import check_host, collides, fmt_addr, normalize_route_host, parse_listen, parse_target
from edgeplane.http.fields import UnsafeField, check_field
from edgeplane.http.paths import PathPolicy
from edgeplane.observability.access_format import FormatError, compile_format
from edgeplane.upstream.client import split_url

_TOKEN_MAX = 4096  # bytes of an admin bearer token
_TOKEN_WEAK = 16  # fewer characters: a warning


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and the name localhost; no DNS at load."""
    import ipaddress

    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class CoreSections(LoadContext):
    def resolve_file_paths(self, raw: dict) -> None:
        """Every core key that names a file or folder, resolved against the config
        file's folder (`LoadContext.resolve_paths`), before any section reads one."""
        self.resolve_paths(raw, "data_dir")
        self.resolve_paths(raw.get("admin"), ("tls", "cert"), ("tls", "key"), ("tls", "client_ca"),
                           ("auth", "token_file"))
        tls = raw.get("tls")
        self.resolve_paths(tls, "client_ca")
        certificates = tls.get("certificates") if isinstance(tls, dict) else None
        for entry in certificates if isinstance(certificates, list) else ():
            self.resolve_paths(entry, "cert", "key")
        self.resolve_paths(raw.get("access_log"), "path")
        stages = raw.get("stages")
        for spec in stages.values() if isinstance(stages, dict) else ():
            self.resolve_paths(spec.get("access_log") if isinstance(spec, dict) else None, "path")
        upstreams = raw.get("upstreams")
        for spec in upstreams.values() if isinstance(upstreams, dict) else ():
            self.resolve_paths(spec, ("tls", "ca_file"), ("tls", "cert_file"), ("tls", "key_file"))

    def listen(self, raw: dict) -> tuple[model.ListenAddress, ...]:
        return tuple(self.listen_list(raw.get("listen"), ("listen",), []))

    def listen_list(self, value: Any, path: Path,
                    seen: list[tuple[Path, model.ListenAddress]]) -> list[model.ListenAddress]:
        """One address or a list of them at `path`; each must not collide with an
        earlier one or with `seen` (extended with what is parsed here)."""
        if isinstance(value, str):
            items: list[tuple[Path, Any]] = [(path, value)]
        elif isinstance(value, list):
            items = [(path + (i,), v) for i, v in enumerate(value)]
        else:
            return []
        out: list[model.ListenAddress] = []
        for item_path, text in items:
            if not isinstance(text, str):
                continue
            try:
                addr = parse_listen(text)
            except ValueError as exc:
                self.fail(item_path, str(exc))
                continue
            for other_path, other in seen:
                if collides(addr, other):
                    self.fail(item_path, f"{text!r} collides with {loc(other_path)} "
                                         f"('{fmt_addr(other)}')")
                    break
            seen.append((item_path, addr))
            out.append(addr)
        return out

    def admin(self, raw: dict, listen: Iterable[model.ListenAddress]) -> model.AdminConfig:
        """`admin`: the listener, its TLS and who may call it. A listener must either
        name credentials (`auth`) or say that anyone may call it (`insecure: true`);
        tokens are read here, once, from a file or the environment, never the config."""
        section = raw.get("admin")
        if not isinstance(section, dict) or not isinstance(section.get("listen"), str):
            return model.AdminConfig()
        p: Path = ("admin",)
        try:
            addr = parse_listen(section["listen"])
        except ValueError as exc:
            self.fail(p + ("listen",), str(exc))
            return model.AdminConfig()
        for data in listen:
            if collides(addr, data):
                self.fail(p + ("listen",), f"admin listener '{fmt_addr(addr)}' collides with data "
                                           f"listener '{fmt_addr(data)}'")
                break
        tls = self._admin_tls(section.get("tls"), p + ("tls",))
        auth = section.get("auth")
        token, mtls = self._admin_auth(auth, p + ("auth",), section) if isinstance(auth, dict) else (None, False)
        public = self._admin_public_paths(section.get("public_paths"), p + ("public_paths",))
        insecure = section.get("insecure") is True
        loopback = _is_loopback(addr.host)
        where = f"admin listener '{fmt_addr(addr)}'"
        if "auth" in section and insecure:
            self.fail(p + ("insecure",), "contradicts admin.auth (insecure: true means no credentials "
                                         "are asked): remove one of them")
        elif "auth" not in section and not insecure:
            reach = ("is not on a loopback address" if not loopback
                     else "serves any local user or process that connects")
            self.fail(p, f"the {where} {reach} and has no authentication: add admin.auth "
                         "(token_file or token_env, and/or mtls: true) to require credentials, or "
                         "set admin.insecure: true to serve it without credentials on purpose")
        elif insecure and not loopback:
            self.warn(p + ("insecure",), f"the {where} is not on a loopback address: /stats, /routes, "
                                         "/upstreams and @connections are served to anyone who reaches it")
        if token is not None and tls is None and not loopback:
            self.warn(p + ("auth",), f"the bearer token crosses the network in clear text to the "
                                     f"{where}: add admin.tls")
        if tls is not None and tls.client_ca is not None:
            if not mtls:
                self.fail(p + ("tls", "client_ca"), "only used with admin.auth.mtls: true")
            from dataclasses import replace

            # With public paths a client without a certificate must still complete the
            # handshake (a load balancer's /healthz); every other path then answers 401.
            tls = replace(tls, client_cert="optional" if public else "required")
        return model.AdminConfig(addr, token=token, mtls=mtls, tls=tls, insecure=insecure,
                                 public_paths=public)

    def _admin_tls(self, section: Any, p: Path) -> model.TlsConfig | None:
        """`admin.tls`: one certificate, an optional client CA (mTLS), a minimum version."""
        from edgeplane.http.tls import CertError, inspect_pair

        if not isinstance(section, dict):
            return None
        cert, key = section.get("cert"), section.get("key")
        if not isinstance(cert, str) or not isinstance(key, str):
            return None  # the schema reported the missing key
        try:
            inspect_pair(cert, key)
        except CertError as exc:
            self.fail(p, str(exc))
        client_ca = section.get("client_ca") if isinstance(section.get("client_ca"), str) else None
        if client_ca is not None:
            self.ca_file(client_ca, p + ("client_ca",))
        version = section.get("min_version", "1.2")
        if isinstance(version, float):  # YAML reads a bare 1.2 as a number
            version = f"{version:g}"
        if version not in ("1.2", "1.3"):
            self.fail(p + ("min_version",), f"must be '1.2' or '1.3', got {_short(version)}")
            version = "1.2"
        return model.TlsConfig(listen=(), certificates=(model.TlsCertificate(cert, key, ()),),
                               min_version=version, client_ca=client_ca)

    def _admin_auth(self, auth: dict, p: Path, section: dict) -> tuple[bytes | None, bool]:
        """`admin.auth` -> (the bearer token or None, whether a client certificate is required)."""
        if "token" in auth:
            self.fail(p + ("token",), "a token is never written in the config (the file travels: "
                                      "version control, backups, the workers' environment): put it "
                                      "in a file named by token_file, or in an environment variable "
                                      "named by token_env")
        file, env = auth.get("token_file"), auth.get("token_env")
        token = None
        if isinstance(file, str) and isinstance(env, str):
            self.fail(p, "token_file and token_env are both set: choose one")
        elif isinstance(file, str):
            token = self._admin_token_file(file, p + ("token_file",))
        elif isinstance(env, str):
            import os

            value = os.environ.get(env)
            if value is None:
                self.fail(p + ("token_env",), f"environment variable {env} is not set")
            else:
                token = self._admin_token(value.encode("utf-8", "surrogateescape"), p + ("token_env",),
                                          f"environment variable {env}")
        mtls = auth.get("mtls") is True
        tls = section.get("tls")
        if mtls and not (isinstance(tls, dict) and "client_ca" in tls):
            self.fail(p + ("mtls",), "needs admin.tls with client_ca (the CA file that client "
                                     "certificates must chain to)")
        if not mtls and not {"token", "token_file", "token_env"} & auth.keys():
            self.fail(p, "names no credential: set token_file or token_env (a bearer token), "
                         "and/or mtls: true (a client certificate)")
        return token, mtls

    def _admin_token_file(self, file: str, p: Path) -> bytes | None:
        import os
        import stat

        try:
            with open(file, "rb") as fh:
                data = fh.read(_TOKEN_MAX + 2)  # a trailing newline and one byte too many
                mode = os.fstat(fh.fileno()).st_mode
        except FileNotFoundError:
            self.fail(p, f"file not found: {file}")
            return None
        except OSError as exc:
            self.fail(p, f"cannot read {file}: {exc.strerror or exc}")
            return None
        token = self._admin_token(data, p, f"file {file}")
        if token is not None and mode & stat.S_IROTH:
            self.warn(p, f"{file} is readable by every user (mode {stat.S_IMODE(mode):o}): chmod o-r {file}")
        return token

    def _admin_token(self, data: bytes, p: Path, what: str) -> bytes | None:
        """The token in `data` (surrounding whitespace, such as a final newline, removed);
        messages never quote it."""
        token = data.strip()
        if not token:
            self.fail(p, f"{what} is empty")
            return None
        if len(token) > _TOKEN_MAX:
            self.fail(p, f"the token in {what} is longer than {_TOKEN_MAX} bytes")
            return None
        if not all(0x21 <= b <= 0x7E for b in token):
            self.fail(p, f"the token in {what} must be printable ASCII without spaces (it is sent "
                         "as 'Authorization: Bearer TOKEN')")
            return None
        if len(token) < _TOKEN_WEAK:
            self.warn(p, f"the token in {what} has only {len(token)} characters: use at least 32 "
                         "random ones (e.g. openssl rand -hex 32)")
        return token

    def _admin_public_paths(self, value: Any, p: Path) -> tuple[str, ...]:
        """`admin.public_paths`: admin GET endpoints served without credentials."""
        if not isinstance(value, list):
            return model.AdminConfig().public_paths
        choices = model.AdminConfig.PUBLIC_PATH_CHOICES
        out: list[str] = []
        for i, path in enumerate(value):
            if not isinstance(path, str):
                continue
            if path not in choices:
                self.fail(p + (i,), f"{path!r} cannot be public: choose among {', '.join(choices)} "
                                    "(@connections always needs credentials)")
            elif path not in out:
                out.append(path)
        return tuple(out)

    def upstreams(self, raw: dict) -> dict[str, model.UpstreamConfig]:
        section = raw.get("upstreams")
        if not isinstance(section, dict):
            return {}
        out: dict[str, model.UpstreamConfig] = {}
        for name, spec in section.items():
            path: Path = ("upstreams", name)
            if not isinstance(name, str):
                self.fail(path, f"upstream names must be strings, got {_describe(name)}")
                continue
            if not isinstance(spec, dict):
                continue
            found = spec.get("targets")
            written = [(item.get("url"), item.get("weight", 1)) if isinstance(item, dict) else (item, 1)
                       for item in found] if isinstance(found, list) else []
            templates: tuple[tuple[str, int], ...] = ()
            targets: tuple[model.Target, ...] = ()
            weights: tuple[int, ...] = ()
            if any(isinstance(url, str) and "${stageVariables." in url for url, _ in written):
                # resolved and checked per stage (`config.stages`): a template of every target
                templates = tuple((url, weight) for url, weight in written
                                  if isinstance(url, str) and isinstance(weight, int))
            else:
                targets, weights = self.targets(found, path + ("targets",))
            pool = self.pool(spec.get("pool"), path + ("pool",))
            tls = self.upstream_tls(spec.get("tls"), path + ("tls",), targets)
            out[name] = model.UpstreamConfig(name, targets, pool, tls, weights, templates,
                                             resilience.load(spec, path, self))
        return out

    def targets(self, value: Any, path: Path) -> tuple[tuple[model.Target, ...], tuple[int, ...]]:
        """The targets and, when any is written `{url, weight}`, one weight each (else ())."""
        if not isinstance(value, list):
            return (), ()
        out: list[model.Target] = []
        weights: list[int] = []
        for i, item in enumerate(value):
            text, weight, where = item, 1, path + (i,)
            if isinstance(item, dict):
                text, weight, where = item.get("url"), item.get("weight", 1), path + (i, "url")
            if not isinstance(text, str) or not isinstance(weight, int) or isinstance(weight, bool):
                continue  # the schema pass reported it
            try:
                target = parse_target(text)
            except ValueError as exc:
                self.fail(where, str(exc))
                continue
            if target in out:
                self.fail(where, f"duplicate target {str(target)!r}")
                continue
            out.append(target)
            weights.append(weight)
        if out and not any(weights):
            self.fail(path, "every target has weight 0: at least one must take requests")
        weighted = any(isinstance(item, dict) and "weight" in item for item in value)
        return tuple(out), tuple(weights) if weighted else ()

    def ca_file(self, ca_file: str, path: Path) -> None:
        """A PEM CA bundle that OpenSSL can load."""
        import ssl

        try:
            ssl.create_default_context(cafile=ca_file)
        except FileNotFoundError:
            self.fail(path, f"file not found: {ca_file}")
        except (OSError, ssl.SSLError) as exc:
            self.fail(path, f"cannot load CA file {ca_file}: {getattr(exc, 'reason', None) or exc}")

    def upstream_tls(self, section: Any, path: Path,
                     targets: tuple[model.Target, ...]) -> model.UpstreamTls:
        if not isinstance(section, dict):
            return model.UpstreamTls()
        if targets and not any(t.scheme == "https" for t in targets):
            self.fail(path, "only used with https:// targets")
        ca_file = section.get("ca_file") if isinstance(section.get("ca_file"), str) else None
        if ca_file is not None:
            self.ca_file(ca_file, path + ("ca_file",))
        server_name = section.get("server_name")
        if isinstance(server_name, str):
            try:
                check_host(server_name, f"invalid server name {server_name!r}")
            except ValueError as exc:
                self.fail(path + ("server_name",), str(exc))
        else:
            server_name = None
        verify = section.get("verify", True)
        cert, key = section.get("cert_file"), section.get("key_file")
        if isinstance(cert, str) != isinstance(key, str):
            self.fail(path, "give both 'cert_file' and 'key_file' (the client certificate and its key)")
            cert = key = None
        elif isinstance(cert, str) and isinstance(key, str):
            import ssl

            try:  # loaded now, so a bad pair is a located error, not a failed request later
                ssl.create_default_context().load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                self.fail(path + ("cert_file",), f"cannot load the client certificate and key: "
                                                 f"{getattr(exc, 'strerror', None) or exc}")
        return model.UpstreamTls(ca_file=ca_file, verify=verify if isinstance(verify, bool) else True,
                                 server_name=server_name, cert_file=cert if isinstance(cert, str) else None,
                                 key_file=key if isinstance(key, str) else None)

    def tls(self, raw: dict, taken: list[tuple[Path, model.ListenAddress]]) -> model.TlsConfig | None:
        from edgeplane.http.tls import CertError, inspect_pair

        section = raw.get("tls")
        if not isinstance(section, dict):
            return None
        p: Path = ("tls",)
        listen = self.listen_list(section.get("listen"), p + ("listen",), list(taken))
        certs: list[model.TlsCertificate] = []
        entries = section.get("certificates")
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            cp: Path = p + ("certificates", i)
            if not isinstance(entry, dict):
                continue
            cert, key = entry.get("cert"), entry.get("key")
            if not isinstance(cert, str) or not isinstance(key, str):
                continue
            try:
                info = inspect_pair(cert, key)
            except CertError as exc:
                self.fail(cp, str(exc))
                continue
            hosts: list[str] = []
            given = entry.get("hosts")
            if isinstance(given, list):
                for j, h in enumerate(given):
                    if not isinstance(h, str):
                        continue
                    try:
                        hosts.append(normalize_route_host(h))
                    except ValueError as exc:
                        self.fail(cp + ("hosts", j), str(exc))
            else:
                hosts = list(info.dns_names)
                if not hosts and i > 0:
                    self.fail(cp, f"{cert} has no DNS names in its subjectAltName: set 'hosts' "
                                  "(only the first, default certificate may go without)")
            certs.append(model.TlsCertificate(cert, key, tuple(hosts)))
        version = section.get("min_version", "1.2")
        if isinstance(version, float):
            version = f"{version:g}"
        if isinstance(version, (str, int)) and not isinstance(version, bool) and str(version) not in ("1.2", "1.3"):
            self.fail(p + ("min_version",), f"must be '1.2' or '1.3', got {_short(version)}")
            version = "1.2"
        client_ca = section.get("client_ca") if isinstance(section.get("client_ca"), str) else None
        client_cert = section.get("client_cert")
        if client_cert is not None and client_ca is None:
            self.fail(p + ("client_cert",), "needs 'client_ca' (the CA client certificates chain to)")
        if client_ca is not None:
            self.ca_file(client_ca, p + ("client_ca",))
        mode: Literal["none", "optional", "required"] = (
            "none" if client_ca is None
            else (client_cert if client_cert in ("optional", "required") else "required"))
        return model.TlsConfig(listen=tuple(listen), certificates=tuple(certs),
                               min_version=version if version in ("1.2", "1.3") else "1.2",
                               client_ca=client_ca, client_cert=mode)

    def pool(self, section: Any, path: Path) -> model.PoolConfig:
        if not isinstance(section, dict):
            return model.PoolConfig()
        d = model.PoolConfig()
        return model.PoolConfig(
            max_connections=self.integer(section, "max_connections", d.max_connections),
            max_idle=self.integer(section, "max_idle", d.max_idle),
            idle_timeout=self.duration(section, "idle_timeout", path, d.idle_timeout),
            connect_timeout=self.duration(section, "connect_timeout", path, d.connect_timeout),
            max_waiters=self.integer(section, "max_waiters", d.max_waiters),
            wait_timeout=self.duration(section, "wait_timeout", path, d.wait_timeout),
        )

    def limits(self, raw: dict) -> model.Limits:
        section = raw.get("limits")
        if not isinstance(section, dict):
            return model.Limits()
        d, p = model.Limits(), ("limits",)
        return model.Limits(
            max_head_bytes=self.size(section, "max_head_bytes", p, d.max_head_bytes, low=256),
            max_headers=self.integer(section, "max_headers", d.max_headers),
            max_body_bytes=self.size(section, "max_body_bytes", p, d.max_body_bytes),
            head_timeout=self.duration(section, "head_timeout", p, d.head_timeout),
            body_timeout=self.duration(section, "body_timeout", p, d.body_timeout),
            keepalive_timeout=self.duration(section, "keepalive_timeout", p, d.keepalive_timeout),
            send_timeout=self.duration(section, "send_timeout", p, d.send_timeout),
            max_pipelined=self.integer(section, "max_pipelined", d.max_pipelined),
            request_buffering=self.size(section, "request_buffering", p, d.request_buffering),
            **self._min_body_rate(section, p, d),
            max_connections=0 if section.get("max_connections") == "auto"
            else self.integer(section, "max_connections", d.max_connections),
            max_connections_per_ip=self.integer(section, "max_connections_per_ip",
                                                d.max_connections_per_ip),
        )

    def _min_body_rate(self, section: dict, p: Path, d: model.Limits) -> dict[str, Any]:
        """`min_body_rate: {bytes, per}`; `bytes: 0` leaves only the gap rule: one byte
        per `body_timeout` (a body that stops entirely is always cut)."""
        rate = section.get("min_body_rate")
        if not isinstance(rate, dict):
            return {}
        rp = (*p, "min_body_rate")
        need = self.size(rate, "bytes", rp, d.min_body_bytes)
        window = self.duration(rate, "per", rp, d.min_body_window)
        if need == 0:
            return {"min_body_bytes": 1,
                    "min_body_window": self.duration(section, "body_timeout", p, d.body_timeout)}
        return {"min_body_bytes": need, "min_body_window": window}

    def path_policy(self, http: dict) -> PathPolicy:
        """`http.path_normalization`: each step on by default (see http.paths)."""
        section = http.get("path_normalization")
        if not isinstance(section, dict):
            return PathPolicy()
        d = PathPolicy()
        values: dict[str, Any] = {}
        for key in ("merge_slashes", "remove_dot_segments", "decode_unreserved"):
            value = section.get(key, getattr(d, key))
            values[key] = value if isinstance(value, bool) else getattr(d, key)
        for key in ("escaped_slashes", "backslashes", "path_parameters"):
            value = section.get(key, getattr(d, key))
            values[key] = value if value in ("reject", "keep") else getattr(d, key)
        return PathPolicy(**values)

    def access_log(self, raw: dict) -> model.AccessLogConfig:
        section = raw.get("access_log")
        if not isinstance(section, dict):
            return model.AccessLogConfig()
        return self._access_log(section, ("access_log",), model.AccessLogConfig())

    def _access_log(self, section: dict, p: Path, d: model.AccessLogConfig) -> model.AccessLogConfig:
        """An `access_log` section at `p`, its unset keys from `d`."""
        destination = section.get("destination", d.destination)
        if destination is False:  # YAML 1.1 reads a bare `off` as false
            destination = "off"
        if destination not in ("stdout", "stderr", "file", "logging", "off"):
            destination = d.destination
        log_path = section.get("path")
        if not isinstance(log_path, str):
            log_path = None
        if destination == "file" and "path" not in section:
            self.fail(p, "missing required key 'path' (destination is 'file')")
        elif destination == "file" and log_path is not None and not log_path.strip():
            self.fail(p + ("path",), "must not be empty")
        elif destination != "file" and "path" in section:
            self.fail(p + ("path",), f"only used with destination 'file' (destination is {destination!r})")
        if "format" not in section and d.format is not None:  # a stage's: the gateway's format
            section = {**section, "format": dict(d.format) if isinstance(d.format, tuple) else d.format}
        return model.AccessLogConfig(
            destination=destination,
            path=log_path if destination == "file" else None,
            flush_interval=self.duration(section, "flush_interval", p, d.flush_interval),
            buffer_bytes=self.size(section, "buffer_bytes", p, d.buffer_bytes, low=1),
            queue_bytes=self.size(section, "queue_bytes", p, d.queue_bytes, low=1024),
            **self._access_format(section.get("format"), p + ("format",)),
        )

    def stage_access_logs(self, raw: dict, access_log: model.AccessLogConfig) -> model.AccessLogConfig:
        """`access_log` with each stage's own format (`stages.NAME.access_log.format`), and
        the stages that log to a destination of their own (`destination`, `path`)."""
        stages = raw.get("stages")
        formats, renders, own = [], {}, {}
        for name, spec in stages.items() if isinstance(stages, dict) else ():
            section = spec.get("access_log") if isinstance(spec, dict) else None
            if not isinstance(section, dict):
                continue
            p = ("stages", name, "access_log")
            if "destination" in section or "path" in section:
                own[str(name)] = self._access_log(section, p, access_log)
                continue
            found = self._access_format(section.get("format"), p + ("format",))
            if found:
                formats.append((str(name), found["format"]))
                renders[str(name)] = found["render"]
        if not formats and not own:
            return access_log
        return dataclasses.replace(access_log, stage_formats=tuple(formats), stage_renders=renders,
                                   stage_logs=tuple(own.items()))

    def _access_format(self, fmt: Any, path: Path) -> dict[str, Any]:
        """`format` and its compiled render function, or nothing when absent or invalid
        (each error located: the key of a mapping format, or the format itself)."""
        if not isinstance(fmt, (str, dict)):
            return {}
        names: dict[str, str] = {}
        for policy in self.registry.policies() if self.registry is not None else ():
            names.update(getattr(policy, "context_variables", {}) or {})
        try:
            render = compile_format(fmt, names)
        except FormatError as exc:
            self.fail(path + ((exc.where,) if exc.where is not None and isinstance(fmt, dict) else ()), str(exc))
            return {}
        return {"format": tuple(fmt.items()) if isinstance(fmt, dict) else fmt, "render": render}


    def tracing(self, raw: dict) -> model.TracingConfig | None:
        section = raw.get("tracing")
        if not isinstance(section, dict):
            return None
        path: Path = ("tracing",)
        found = section.get("otlp")
        otlp: dict[str, Any] = found if isinstance(found, dict) else {}
        endpoint = otlp.get("endpoint")
        if not isinstance(endpoint, str):
            return None  # the schema names the missing key
        try:
            split_url(endpoint)
        except ValueError as exc:
            self.fail(path + ("otlp", "endpoint"), str(exc))
        found = otlp.get("headers")
        headers: dict[str, Any] = found if isinstance(found, dict) else {}
        for name, value in headers.items():
            try:
                check_field(str(name).encode("latin-1"), str(value).encode("utf-8"))
            except (UnsafeField, UnicodeEncodeError) as exc:
                self.fail(path + ("otlp", "headers", name), f"cannot be sent: {exc}")
        ratio = section.get("sample_ratio", 1.0)
        d = model.TracingConfig(endpoint=endpoint)
        return model.TracingConfig(
            endpoint=endpoint,
            sample_ratio=float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else 1.0,
            service_name=str(section.get("service_name", d.service_name)),
            headers=tuple((str(k), str(v)) for k, v in headers.items()),
            timeout=self.duration(otlp, "timeout", path + ("otlp",), d.timeout, high=60.0),
            max_queue=int(section.get("max_queue", d.max_queue)),
            max_batch=int(section.get("max_batch", d.max_batch)),
            flush_interval=self.duration(section, "flush_interval", path, d.flush_interval, high=60.0))

    def cluster(self, raw: dict) -> model.ClusterConfig | None:
        section = raw.get("cluster")
        if not isinstance(section, dict) or not isinstance(section.get("redis"), str):
            return None
        path: Path = ("cluster",)
        url = section["redis"]
        try:
            from redis.asyncio.connection import parse_url

            parse_url(url)
        except (ValueError, TypeError) as exc:
            self.fail(path + ("redis",), f"not a Redis URL: {exc}")
        lease = section.get("lease", 0.1)
        return model.ClusterConfig(
            redis=url,
            key_prefix=section.get("key_prefix", "edgeplane:"),
            failure_mode=section.get("failure_mode", "open"),
            timeout=self.duration(section, "timeout", path, 0.1, high=60.0),
            lease=float(lease) if isinstance(lease, (int, float)) and not isinstance(lease, bool) else 0.1,
            retry_interval=self.duration(section, "retry_interval", path, 1.0, high=3600.0))
