"""The model catalog (`models.yaml`): providers, models, prices.

Parsing is pure (`parse_catalog` takes the decoded YAML); `load_catalog` reads the
file. Prices stay `Decimal` so money never passes through a float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from shared.decimals import parse_decimal
from shared.input_size import IMAGE_TOKENS, InputRates, input_rates

# Credits per million tokens; far above any real price, low enough that a cost
# (tokens x price) stays exact in decimal arithmetic.
MAX_PRICE = Decimal(10**9)
# Any token count of the catalog (context, output, per image): a reservation keeps
# its token counts in 32-bit columns (PostgreSQL `integer`), so a larger limit would
# fail every init on the model with a 500 (review 3A, finding 6).
MAX_TOKEN_COUNT = 2**31 - 1

API_TYPES = frozenset({"openai_chat", "anthropic_messages", "gemini", "sse_backend"})
# Content features a wire format cannot carry (`stream_edge/upstream/parts.py`):
# Anthropic's Messages API takes no audio.
UNSUPPORTED_FEATURES = {"anthropic_messages": frozenset({"audio"})}
# A dotted path into an event's JSON: keys, or digits that index arrays (`choices.0.text`).
_FIELD_PATH = re.compile(r"[^.\s]+(\.[^.\s]+)*")


class CatalogError(ValueError):
    """The catalog file is malformed; the message names the offending entry."""


@dataclass(frozen=True, slots=True)
class Price:
    """Credits per million tokens (DESIGN §9 "Money", §11 "Prices"). Cache reads and
    cache writes have their own rates when the vendor prices them apart; unset, they
    cost what any input token costs."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None

    @property
    def cached_input_rate(self) -> Decimal:
        return (
            self.input_per_mtok
            if self.cached_input_per_mtok is None
            else self.cached_input_per_mtok
        )

    @property
    def cache_write_rate(self) -> Decimal:
        return (
            self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        )

    def raw(self) -> dict[str, str]:
        """As `models.yaml` and `/v1/models` write it (the cache rates only when set)."""
        out = {
            "input_per_mtok": str(self.input_per_mtok),
            "output_per_mtok": str(self.output_per_mtok),
        }
        if self.cached_input_per_mtok is not None:
            out["cached_input_per_mtok"] = str(self.cached_input_per_mtok)
        if self.cache_write_per_mtok is not None:
            out["cache_write_per_mtok"] = str(self.cache_write_per_mtok)
        return out


@dataclass(frozen=True, slots=True)
class SSEBackendSpec:
    """Where an `sse_backend` provider answers, and where each event keeps its fields.

    The defaults describe the plain in-house convention: `data: {"delta": "…"}` lines,
    a last `data: {"usage": {"input": n, "output": n}, "finish": "stop"}`, then
    `data: [DONE]`. Each `*_path` is a dotted path into the event's JSON.
    """

    path: str = ""
    content_path: str = "delta"
    usage_input_path: str = "usage.input"
    usage_output_path: str = "usage.output"
    finish_path: str = "finish"
    error_path: str = "error"
    # OpenAI-shaped tool-call deltas: `[{"index", "id"?, "function": {"name"?, "arguments"}}]`.
    tool_calls_path: str = "tool_calls"


SSE_BACKEND_KEYS = tuple(f.name for f in fields(SSEBackendSpec))


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    api_type: str
    base_url: str
    api_key_env: str | None = None
    service_token_env: str | None = None
    sse: SSEBackendSpec | None = None  # set for every `sse_backend` provider
    # Several platform keys (a key pool, `stream_edge.key_pool`), after `api_key_env`'s.
    api_key_envs: tuple[str, ...] = ()

    def key_envs(self) -> tuple[str, ...]:
        """Every variable that may hold a platform key for this provider, in order."""
        first = (self.api_key_env,) if self.api_key_env else ()
        return first + tuple(v for v in self.api_key_envs if v != self.api_key_env)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    provider: str
    upstream_model: str
    context_length: int
    max_output_tokens: int
    price: Price
    features: tuple[str, ...] = ("streaming",)
    # What one image costs in the input estimate (`shared.input_size`).
    image_input_tokens: int = IMAGE_TOKENS
    # Models tried in order when this one fails before its first byte (DESIGN §11).
    fallbacks: tuple[str, ...] = ()

    def input_rates(self, api_type: str) -> InputRates:
        """The estimate's rates for this model on a provider of `api_type`."""
        return input_rates(api_type, self.image_input_tokens)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "context_length": self.context_length,
            "max_output_tokens": self.max_output_tokens,
            "features": list(self.features),
            "price": self.price.raw(),
        }


@dataclass(frozen=True, slots=True)
class Catalog:
    default_model: str
    providers: dict[str, Provider]
    models: dict[str, ModelSpec] = field(default_factory=dict)

    def model(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, float):
        # A YAML float like 0.15: str() first, so it becomes Decimal("0.15"), not
        # its binary value; `parse_decimal` refuses floats from JSON bodies.
        value = str(value)
    try:
        return parse_decimal(value, max_abs=MAX_PRICE, max_places=12, negative=False)
    except ValueError as exc:
        raise CatalogError(f"{where} {exc}") from None


PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "cache_write_per_mtok")


def _price(price: dict[str, Any], where: str) -> Price:
    unknown = sorted(set(price) - set(PRICE_KEYS))
    if unknown:
        raise CatalogError(f"{where}.{unknown[0]} is not a price ({', '.join(PRICE_KEYS)})")
    optional = {
        key: _decimal(price[key], f"{where}.{key}")
        for key in ("cached_input_per_mtok", "cache_write_per_mtok")
        if price.get(key) is not None
    }
    return Price(
        input_per_mtok=_decimal(price.get("input_per_mtok"), f"{where}.input"),
        output_per_mtok=_decimal(price.get("output_per_mtok"), f"{where}.output"),
        **optional,
    )


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TOKEN_COUNT:
        raise CatalogError(f"{where} must be a positive integer of at most {MAX_TOKEN_COUNT}")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CatalogError(f"{where} must be a mapping")
    return value


def _upstream_model(spec: dict[str, Any], model_id: str, where: str) -> str:
    """The name the vendor knows (absent: the model's id). Set, it must be a name: a
    YAML `upstream_model:` left empty was the model "None", a space or a newline went
    to the vendor as given, so every stream of the model failed after a clean start."""
    if "upstream_model" not in spec:
        return model_id
    value = spec["upstream_model"]
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= 1000
        or any(c.isspace() or not c.isprintable() for c in value)
    ):
        raise CatalogError(
            f"{where} must be the vendor's model name (non-empty, no spaces); "
            "leave it out to use the model's id"
        )
    return value


MAX_FALLBACKS = 5
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


def _env_name(value: Any, where: str) -> str | None:
    """A provider's key variable (unset: None). Any other value was looked up as given
    (`7`, `"OPENAI_API_KEY "`), found nothing, and the provider's streams went to the
    vendor without the platform's key, each refused, after a clean start."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise CatalogError(f"{where} must be an environment variable name like OPENAI_API_KEY")
    return value


def _env_names(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _ENV_NAME.fullmatch(v) for v in value
    ):
        raise CatalogError(f"{where} must be a list of environment variable names")
    return tuple(value)


def parse_fallbacks(value: Any, model_id: str, where: str) -> tuple[str, ...]:
    """A model's `fallbacks`: distinct model ids, not itself, at most MAX_FALLBACKS."""
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or not all(isinstance(v, str) and 0 < len(v) <= 200 for v in value)
        or len(set(value)) != len(value)
        or model_id in value
    ):
        raise CatalogError(f"{where} must be a list of distinct other model ids")
    if len(value) > MAX_FALLBACKS:
        raise CatalogError(f"{where} may name at most {MAX_FALLBACKS} models")
    return tuple(value)


def _sse_spec(spec: dict[str, Any], api_type: str, where: str) -> SSEBackendSpec | None:
    given = {key: spec[key] for key in SSE_BACKEND_KEYS if key in spec}
    if api_type != "sse_backend":
        if given:
            raise CatalogError(f"{where}.{min(given)} applies to api_type sse_backend only")
        return None
    for key, value in given.items():
        if not isinstance(value, str):
            raise CatalogError(f"{where}.{key} must be a string")
        if key == "path":
            if value and (not value.startswith("/") or any(c.isspace() for c in value)):
                raise CatalogError(f"{where}.path must start with '/' and have no spaces")
        elif not _FIELD_PATH.fullmatch(value):
            raise CatalogError(f"{where}.{key} must be a dotted path like 'usage.input'")
    return SSEBackendSpec(**given)


def parse_catalog(raw: Any, *, check_fallbacks: bool = True) -> Catalog:
    """`check_fallbacks`: every `fallbacks` entry must name a model of this document
    (off for a company's single-model override, checked against its whole view)."""
    doc = _mapping(raw, "catalog")
    providers: dict[str, Provider] = {}
    for name, spec in _mapping(doc.get("providers"), "providers").items():
        spec = _mapping(spec, f"providers.{name}")
        api_type = spec.get("api_type")
        if api_type not in API_TYPES:
            raise CatalogError(f"providers.{name}.api_type must be one of {sorted(API_TYPES)}")
        base_url = spec.get("base_url")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise CatalogError(f"providers.{name}.base_url must be an http(s) URL")
        providers[str(name)] = Provider(
            name=str(name),
            api_type=api_type,
            base_url=base_url.rstrip("/"),
            api_key_env=_env_name(spec.get("api_key_env"), f"providers.{name}.api_key_env"),
            service_token_env=_env_name(
                spec.get("service_token_env"), f"providers.{name}.service_token_env"
            ),
            sse=_sse_spec(spec, api_type, f"providers.{name}"),
            api_key_envs=_env_names(spec.get("api_key_envs"), f"providers.{name}.api_key_envs"),
        )
    models: dict[str, ModelSpec] = {}
    for model_id, spec in _mapping(doc.get("models"), "models").items():
        where = f"models.{model_id}"
        spec = _mapping(spec, where)
        provider = spec.get("provider")
        if provider not in providers:
            raise CatalogError(f"{where}.provider names an unknown provider: {provider!r}")
        price = _mapping(spec.get("price"), f"{where}.price")
        features = spec.get("features", ["streaming"])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise CatalogError(f"{where}.features must be a list of strings")
        cannot = UNSUPPORTED_FEATURES.get(providers[provider].api_type, frozenset())
        if cannot & set(features):
            raise CatalogError(
                f"{where}.features: {providers[provider].api_type} cannot carry "
                + ", ".join(sorted(cannot & set(features)))
            )
        models[str(model_id)] = ModelSpec(
            id=str(model_id),
            provider=provider,
            upstream_model=_upstream_model(spec, str(model_id), f"{where}.upstream_model"),
            context_length=_positive_int(spec.get("context_length"), f"{where}.context_length"),
            max_output_tokens=_positive_int(
                spec.get("max_output_tokens"), f"{where}.max_output_tokens"
            ),
            price=_price(price, f"{where}.price"),
            features=tuple(features),
            image_input_tokens=_positive_int(
                spec.get("image_input_tokens", IMAGE_TOKENS), f"{where}.image_input_tokens"
            ),
            fallbacks=parse_fallbacks(spec.get("fallbacks"), str(model_id), f"{where}.fallbacks"),
        )
    if check_fallbacks:
        for model in models.values():
            unknown = [f for f in model.fallbacks if f not in models]
            if unknown:
                raise CatalogError(
                    f"models.{model.id}.fallbacks names an unknown model: {unknown[0]!r}"
                )
    default_model = doc.get("default_model")
    if default_model not in models:
        raise CatalogError(f"default_model {default_model!r} is not in models")
    return Catalog(default_model=default_model, providers=providers, models=models)


def free_on_platform_key(catalog: Catalog) -> list[str]:
    """One line per model priced 0 (every rate) on a provider the platform pays for
    (a vendor key, `api_key_env`/`api_key_envs`): every tenant streams it free on the
    platform's account. Warned about, not refused: a price of 0 may be meant (an
    offer, a trial); a provider with no vendor key (the in-house backend's service
    token, the keyless mock) is nobody's cost and is not named."""
    lines = []
    for model in catalog.models.values():
        provider = catalog.providers[model.provider]
        price = model.price
        rates = (
            price.input_per_mtok,
            price.output_per_mtok,
            price.cached_input_rate,
            price.cache_write_rate,
        )
        if provider.key_envs() and not any(rates):
            lines.append(
                f"models.{model.id} costs 0 credits on provider {provider.name}, which the "
                f"platform's key ({', '.join(provider.key_envs())}) pays for: every tenant "
                "streams it free; give it a price in LLMGW_MODELS_FILE if that is not meant"
            )
    return lines


def load_catalog(path: str | None) -> Catalog:
    """Load `path`, or the packaged catalog when `path` is None."""
    if path is None:
        text = resources.files("shared").joinpath("models.yaml").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise CatalogError(f"invalid YAML: {exc}") from exc
    return parse_catalog(raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice: YAML kept the
    last without a word, so a model block pasted below its original, or a price's
    second `output_per_mtok`, silently set the price in force."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: a merged key may be overridden, as YAML means
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                line = key_node.start_mark.line + 1
                raise CatalogError(f"{key!r} is named twice in one mapping (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
