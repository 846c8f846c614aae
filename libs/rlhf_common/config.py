"""Typed configuration machinery: each service owns one dataclass built on `BaseConfig`.

A service config names its environment prefix (``ENV = "RLHF_POLICY"``); each field gives
the rest of its variable's name with `setting(default, "MAX_TOKENS", help)`, so the field
`max_tokens` reads ``RLHF_POLICY_MAX_TOKENS`` and the flag ``--max-tokens``. Sections that
every server shares are composed in with `section(...)`: `ServerConfig` (bind address,
gRPC port, metrics port) reads ``<ENV>_HOST``, ``<ENV>_PORT`` and ``<ENV>_METRICS_PORT``.

Precedence: flag > env var > default. Validation runs in ``__post_init__`` through
`self.check(...)`, which raises `ConfigError` showing the variable and the bad value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

from . import envs


class ConfigError(ValueError):
    pass


def setting(default, env: str, help: str, secret: bool = False):
    """A field read from ``<ENV>_<env>`` (or from `env` as given when it starts with RLHF_)."""
    return field(default=default, repr=not secret, metadata={"env": env, "help": help})


def section(cls: type, **defaults):
    """A nested config (for example `ServerConfig`) whose variables share the owner's prefix;
    `defaults` override the section's own defaults for this owner."""
    return field(default=None, metadata={"section": cls, "defaults": defaults})


def _parse(raw: str, typ, name: str):
    origin = get_origin(typ)
    try:
        if origin is Literal:
            if raw not in get_args(typ):
                raise ValueError(f"must be one of {list(get_args(typ))}")
            return raw
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be a boolean (true/false)")
        return typ(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r}: {e}") from None


def _env_name(prefix: str, suffix: str) -> str:
    return suffix if suffix.startswith("RLHF_") or not prefix else f"{prefix}_{suffix}"


@dataclass
class BaseConfig:
    """Base of every config: loading from env vars and flags, checks, and the env round trip."""

    ENV: ClassVar[str] = ""
    # Set on sections: the prefix of the config that holds them.
    _prefix: str = field(default="", repr=False, compare=False, metadata={"internal": True})

    # -- names ---------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self._prefix or self.ENV

    def env_of(self, name: str) -> str:
        f = next(f for f in dataclasses.fields(self) if f.name == name)
        return _env_name(self.prefix, f.metadata["env"])

    def check(self, cond: bool, name: str, rule: str, shown: Any = None) -> None:
        """Raise ConfigError naming the field's variable and its value unless `cond` holds."""
        if not cond:
            value = getattr(self, name) if shown is None else shown
            raise ConfigError(f"{self.env_of(name)}={value!r}: {rule}")

    def check_port(self, name: str) -> None:
        self.check(0 <= getattr(self, name) <= 65535, name, "must be a TCP port in 0..65535")

    def check_file(self, name: str) -> None:
        """An optional path setting: empty, or an existing file."""
        path = getattr(self, name)
        self.check(not path or os.path.isfile(path), name, "no such file")

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def _settings(cls):
        return [f for f in dataclasses.fields(cls) if "env" in f.metadata]

    @classmethod
    def _sections(cls):
        return [f for f in dataclasses.fields(cls) if "section" in f.metadata]

    @classmethod
    def _values(cls, prefix: str, flags: dict[str, str]) -> dict:
        hints = typing.get_type_hints(cls)
        values = {}
        for f in cls._settings():
            env = _env_name(prefix, f.metadata["env"])
            raw = envs.get(env)
            if raw is not None:
                values[f.name] = _parse(raw, hints[f.name], env)
            if flags.get(f.name) is not None:
                values[f.name] = _parse(flags[f.name], hints[f.name], "--" + f.name.replace("_", "-"))
        return values

    @classmethod
    def _all_fields(cls):
        """(field, section class or None) for every setting, sections flattened."""
        out = []
        for f in dataclasses.fields(cls):
            if "section" in f.metadata:
                out += [(g, f.metadata["section"]) for g in f.metadata["section"]._settings()]
            elif "env" in f.metadata:
                out.append((f, None))
        return out

    @classmethod
    def load(cls, argv: list[str] | None = None, **overrides):
        """Build from defaults, then env vars, then flags, then keyword overrides (a section
        may be overridden whole, or field by field with a dict)."""
        flags: dict[str, str] = {}
        if argv is not None:
            parser = argparse.ArgumentParser(description=cls.__doc__)
            for f, sec in cls._all_fields():
                env = _env_name(cls.ENV, f.metadata["env"])
                parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                                    help=f"{f.metadata['help']} (env {env}, default {f.default!r})")
            flags = vars(parser.parse_args(argv))
        values = cls._values(cls.ENV, flags)
        for s in cls._sections():
            sub = s.metadata["section"]
            given = overrides.pop(s.name, None)
            if isinstance(given, BaseConfig):
                values[s.name] = given
                continue
            sv = {**s.metadata["defaults"], **sub._values(cls.ENV, flags), **(given or {})}
            values[s.name] = sub(_prefix=cls.ENV, **sv)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        # Sections left out of the constructor get their defaults under this prefix; a dict
        # overrides some of them.
        for s in self._sections():
            given = getattr(self, s.name)
            if given is None or isinstance(given, dict):
                sub = s.metadata["section"]
                setattr(self, s.name, sub(_prefix=self.prefix, **{**s.metadata["defaults"], **(given or {})}))
        self.validate()

    def validate(self) -> None:
        """Checks of the fields' values; raise through `self.check`."""

    def to_env(self) -> dict[str, str]:
        """The env vars that reproduce this config (used to launch service processes)."""
        out = {}
        for f in self._settings():
            v = getattr(self, f.name)
            out[self.env_of(f.name)] = str(v).lower() if isinstance(v, bool) else str(v)
        for s in self._sections():
            out.update(getattr(self, s.name).to_env())
        return out

    @classmethod
    def default_of(cls, name: str, section_name: str | None = None):
        """The default of a field, or of a field of a section as this config sets it."""
        if section_name is None:
            return next(f.default for f in dataclasses.fields(cls) if f.name == name)
        s = next(f for f in cls._sections() if f.name == section_name)
        return s.metadata["defaults"].get(name, s.metadata["section"].default_of(name))

    @classmethod
    def markdown_rows(cls) -> list[str]:
        rows = [f"| **{cls.__name__}** | | {(cls.__doc__ or '').strip()} |"]
        for f, sec in cls._all_fields():
            default = f.default
            if sec is not None:
                default = next(s.metadata["defaults"] for s in cls._sections()
                               if s.metadata["section"] is sec).get(f.name, default)
            shown = "(none)" if default == "" else \
                f"`{str(default).lower() if isinstance(default, bool) else default}`"
            rows.append(f"| `{_env_name(cls.ENV, f.metadata['env'])}` | {shown} | {f.metadata['help']} |")
        return rows


@dataclass
class ServerConfig(BaseConfig):
    """Where a service listens: gRPC and the Prometheus endpoint (a section of each service)."""

    host: str = setting("127.0.0.1", "HOST", "Bind address of gRPC, REST and /metrics")
    port: int = setting(50051, "PORT", "gRPC port")
    metrics_port: int = setting(9100, "METRICS_PORT", "Prometheus /metrics port (0 = off)")
    tls_cert_file: str = setting("", "TLS_CERT_FILE", "PEM certificate chain: serve gRPC over TLS (with TLS_KEY_FILE)")
    tls_key_file: str = setting("", "TLS_KEY_FILE", "PEM private key of TLS_CERT_FILE")

    def validate(self) -> None:
        self.check(bool(self.host), "host", "must be an address to bind")
        self.check_port("port")
        self.check_port("metrics_port")
        self.check(bool(self.tls_cert_file) == bool(self.tls_key_file), "tls_key_file",
                   f"TLS needs both {self.env_of('tls_cert_file')} and {self.env_of('tls_key_file')}")
        self.check_file("tls_cert_file")
        self.check_file("tls_key_file")

    def grpc_credentials(self):
        """Server credentials for TLS, or None for plaintext."""
        if not self.tls_cert_file:
            return None
        import grpc

        with open(self.tls_key_file, "rb") as k, open(self.tls_cert_file, "rb") as c:
            return grpc.ssl_server_credentials([(k.read(), c.read())])


@dataclass
class BusConfig(BaseConfig):
    """Kafka connection shared by every service."""

    ENV: ClassVar[str] = "RLHF"
    bootstrap: str = setting("127.0.0.1:9092", "KAFKA_BOOTSTRAP", "Kafka bootstrap servers, host:port[,host:port]")
    topic_prefix: str = setting("rlhf", "TOPIC_PREFIX", "Prefix of every topic name")
    partitions: int = setting(1, "TOPIC_PARTITIONS", "Partitions of topics created by the services")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = setting(
        "PLAINTEXT", "KAFKA_SECURITY_PROTOCOL", "Kafka client security: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = setting(
        "", "KAFKA_SASL_MECHANISM", "SASL mechanism with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str = setting("", "KAFKA_SASL_USERNAME", "SASL user name")
    sasl_password: str = setting("", "KAFKA_SASL_PASSWORD", "SASL password (from a Secret)", secret=True)
    ssl_cafile: str = setting("", "KAFKA_SSL_CAFILE", "PEM CA bundle that signs the brokers' certificates (SSL, "
                              "SASL_SSL); empty = the system's")
    ssl_certfile: str = setting("", "KAFKA_SSL_CERTFILE", "PEM client certificate, for brokers that require one")
    ssl_keyfile: str = setting("", "KAFKA_SSL_KEYFILE", "PEM private key of KAFKA_SSL_CERTFILE")

    def validate(self) -> None:
        self.check(":" in self.bootstrap, "bootstrap", "must be host:port")
        sasl = self.security_protocol.startswith("SASL")
        self.check(not sasl or bool(self.sasl_mechanism), "sasl_mechanism",
                   f"must be set when {self.env_of('security_protocol')}={self.security_protocol}")
        self.check(not sasl or bool(self.sasl_username and self.sasl_password), "sasl_username",
                   f"SASL needs a user name and {self.env_of('sasl_password')}")
        self.check(bool(self.ssl_certfile) == bool(self.ssl_keyfile), "ssl_keyfile",
                   f"a client certificate needs both {self.env_of('ssl_certfile')} and {self.env_of('ssl_keyfile')}")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            self.check_file(name)
        self.check(self.partitions >= 1, "partitions", "must be >= 1")
        self.check(bool(self.topic_prefix) and "." not in self.topic_prefix, "topic_prefix",
                   "must be a non-empty name without dots")

    def client_options(self) -> dict:
        """kafka-python keyword arguments shared by every producer, consumer and admin client."""
        opts: dict = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            opts.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password)
        if self.security_protocol.endswith("SSL"):
            opts.update(ssl_cafile=self.ssl_cafile or None, ssl_certfile=self.ssl_certfile or None,
                        ssl_keyfile=self.ssl_keyfile or None, ssl_check_hostname=True)
        return opts


def partition_list(raw: str) -> list[int]:
    """'0,2,3' -> [0, 2, 3]; empty -> [] (all partitions). ValueError on anything else."""
    parts = sorted({int(p) for p in raw.split(",") if p.strip()})
    if any(p < 0 for p in parts):
        raise ValueError(f"negative partition in {raw!r}")
    return parts


def markdown_table(configs) -> str:
    """Every setting of the given config classes as a Markdown table."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for cls in configs:
        rows += cls.markdown_rows()
    return "\n".join(rows) + "\n"
