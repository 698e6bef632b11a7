"""Server configuration: defaults < YAML file < ``STEERWATCH_*`` environment variables.

Nested fields use ``__`` in the environment (``STEERWATCH_LIMITS__MAX_BATCH=8``). The YAML file is
named by ``Settings.load(path)`` or ``STEERWATCH_CONFIG``. Every field has bounds, so a bad value fails
at start with the field's dotted name and the allowed range rather than deep inside the engine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.engines.vllm.options import VLLMOptions

if TYPE_CHECKING:  # the engine module imports torch; settings must stay light
    from service.engines.hf import EngineLimits

CONFIG_ENV = "STEERWATCH_CONFIG"
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MiB = 1024 * 1024

SECRET_FIELDS = frozenset({"bootstrap_admin_key"})  # never echoed in error messages

# The YAML data for the Settings() call in progress; a ContextVar because the source hook is a classmethod.
_yaml_data: ContextVar[Mapping[str, Any]] = ContextVar("steerwatch_yaml_data", default=MappingProxyType({}))


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every bad field with its allowed values."""


def explain(err: ValidationError) -> str:
    """One line per error: ``dotted.field: reason (got value)``, readable without pydantic's URLs."""
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{_got(e)}")
    return "; ".join(lines)


def _got(e: Any) -> str:
    """The offending value, shortened; omitted for secrets, missing fields and whole objects."""
    if e["type"] == "missing" or isinstance(e["input"], dict) or SECRET_FIELDS & set(map(str, e["loc"])):
        return ""
    text = repr(e["input"])
    return f" (got {text[:60] + '...' if len(text) > 63 else text})"


class _YamlSource(PydanticBaseSettingsSource):
    """The parsed YAML file as a settings source (below the environment)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get())


def _read_yaml(path: str) -> dict[str, Any]:
    """The file's top-level mapping; ConfigError when missing, unparsable or not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {path!r}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: the top level must be a mapping of settings, "
                          f"got {type(data).__name__}")
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AssetSpec(_Strict):
    """An SAE or probe loaded at start."""

    id: str = Field(pattern=ID_PATTERN, description="id used in requests (1..128 of letters, digits, . _ : -)")
    path: str = Field(min_length=1, description="file or directory to load it from")
    layer: int | None = Field(None, ge=0, le=1024, description="layer override; null = the asset's own layer")


class ServerLimits(_Strict):
    """Engine-wide and transport-wide bounds."""

    max_batch: int = Field(16, ge=1, le=1024, description="requests decoded together")
    max_queue: int = Field(256, ge=0, le=100_000, description="requests waiting for a batch slot")
    max_prompt_tokens: int = Field(4096, ge=1, le=1_048_576, description="largest prompt in tokens")
    max_new_tokens: int = Field(2048, ge=1, le=1_048_576, description="largest max_tokens of a request")
    default_max_tokens: int = Field(128, ge=1, le=1_048_576, description="max_tokens when neither request nor policy give one")
    max_abs_coef: float = Field(16.0, gt=0, le=10_000, description="largest |coef| of an addition, any policy")
    max_message_bytes: int = Field(4 * MiB, ge=1024, le=1024 * MiB, description="largest gRPC message, each way")
    max_concurrent_rpcs: int = Field(256, ge=1, le=100_000, description="RPCs served at once (more wait)")
    max_streams_per_tenant: int = Field(64, ge=1, le=100_000,
                                        description="Generate + WatchAlerts streams one tenant may hold open")
    max_watch_seconds: float = Field(3600.0, gt=0, le=86_400 * 7,
                                     description="a WatchAlerts stream ends (OK) after this; resume with after_id")
    grace_seconds: float = Field(10.0, ge=0, le=3600, description="time in-flight RPCs get on shutdown")
    alert_buffer: int = Field(10_000, ge=1, le=10_000_000,
                              description="alerts held in memory while the store is down (store_outage: serve_cached)")
    request_timeout_seconds: float | None = Field(
        None, gt=0, le=86_400, description="cap on any RPC's deadline; null = the client's deadline only")

    @model_validator(mode="after")
    def _default_within_max(self) -> ServerLimits:
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                             f"max_new_tokens ({self.max_new_tokens})")
        return self

    def engine_limits(self) -> EngineLimits:
        """The engine's view of these limits."""
        from service.engines.hf import EngineLimits  # lazy: pulls in torch

        return EngineLimits(max_batch=self.max_batch, max_queue=self.max_queue, max_abs_coef=self.max_abs_coef,
                            max_prompt_tokens=self.max_prompt_tokens, max_new_tokens=self.max_new_tokens)


class Settings(BaseSettings):
    """Everything ``steerwatch serve`` needs."""

    model_config = SettingsConfigDict(env_prefix="STEERWATCH_", env_nested_delimiter="__", extra="forbid",
                                      validate_default=True)

    model: str = Field("default", min_length=1, description="'default' (embedded Gemma 3 270M) or an HF checkpoint dir")
    quantize: Literal["4bit", "8bit"] | None = Field(None, description="load through bitsandbytes")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?|mps)$", description="cpu, cuda, cuda:N or mps")
    engine: Literal["hf", "vllm", "auto"] = Field(
        "auto", description="generation engine; auto = vllm when installed (and no quantize), else hf")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="vLLM engine options (docs/vllm.md)")
    host: str = Field("0.0.0.0", min_length=1, description="address the gRPC and metrics servers bind")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 = pick a free one")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port; 0 = pick a free one")
    alert_view: bool = Field(True, description="serve the live recent-alerts page at /alerts/ on the metrics port")
    http_tls: bool = Field(False, description="serve the metrics port (/metrics, /alerts/) over TLS with the "
                           "gRPC certificate; the alerts page sends API keys, so use it off loopback")
    store_outage: Literal["serve_cached", "fail_closed"] = Field(
        "serve_cached", description="while Redis is down: serve on cached keys and policies and queue alerts, "
        "or fail every request that needs the store (service/outage.py)")
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", description="shared store; null = in-memory")
    alert_stream_maxlen: int = Field(10_000, ge=1, le=10_000_000, description="alerts kept per tenant")
    saes: list[AssetSpec] = Field(default_factory=list, max_length=64, description="SAEs loaded at start")
    probes: list[AssetSpec] = Field(default_factory=list, max_length=256, description="probes loaded at start")
    monitor_pack: str = Field("auto", min_length=1, description="'auto' (the model's built pack, if any), 'none', "
                              "or a pack directory; its assets are shared as pack:<name> ids")
    tls_cert_file: FilePath | None = Field(None, description="PEM certificate chain; with tls_key_file")
    tls_key_file: FilePath | None = Field(None, description="PEM private key; with tls_cert_file")
    tls_client_ca_file: FilePath | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
    bootstrap_admin_key: SecretStr | None = Field(None, description="admin API key added at start (16+ characters)")
    limits: ServerLimits = Field(default_factory=ServerLimits, description="engine and transport bounds")

    @field_validator("bootstrap_admin_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        # Checked here rather than with min_length so the message never quotes the key.
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file: needs tls_cert_file and tls_key_file (mutual TLS is TLS first)")
        if self.http_tls and self.tls_cert_file is None:
            raise ValueError("http_tls: needs tls_cert_file and tls_key_file")
        for kind, assets in (("saes", self.saes), ("probes", self.probes)):
            ids = [a.id for a in assets]
            if len(set(ids)) != len(ids):
                raise ValueError(f"{kind}: ids must be unique; got {ids}")
        return self

    @property
    def tls(self) -> bool:
        """Whether the gRPC port is served over TLS."""
        return self.tls_cert_file is not None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Earlier sources win: explicit arguments, then the environment, then the YAML file."""
        return init_settings, env_settings, _YamlSource(settings_cls)

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> Settings:
        """Settings from the YAML file (``path`` or $STEERWATCH_CONFIG) and the environment.

        Raises ConfigError naming every invalid field, or a missing/unreadable file.
        """
        path = path or os.environ.get(CONFIG_ENV) or None
        token = _yaml_data.set(_read_yaml(path) if path else {})
        try:
            return cls(**overrides)
        except ValidationError as e:
            where = f" (file {path}, environment STEERWATCH_*)" if path else " (environment STEERWATCH_*)"
            raise ConfigError(f"invalid configuration{where}: {explain(e)}") from None
        finally:
            _yaml_data.reset(token)
