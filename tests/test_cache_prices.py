"""Cache- and reasoning-aware prices (issue 15.3, DESIGN §11 "Prices").

Pure tables for the arithmetic, the vendors' usage and the catalog; then one control
plane on a real socket (SQLite, module-scoped) for what money depends on: the hold
covers a cache write at its dearer rate, each part of a webhook's usage is charged at
its own rate, a split larger than its whole is refused and changes nothing, and a
company on the platform's key cannot lower a cache rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
import pytest
import yaml
from sqlalchemy import select
from sqlmodel import col

from control_plane.company_llm import company_catalog
from control_plane.errors import ValidationFailed
from control_plane.ledger import charge_for
from control_plane.tables import CompanyModel, Reservation
from control_plane.usage_events import parse_usage_event
from shared.catalog import CatalogError, Price, load_catalog, parse_catalog
from shared.pricing import TokenUsage, hold_cost_micro, split_problem, usage_cost_micro
from shared.webhooks import UsageEvent, sign
from stream_edge.upstream.anthropic_messages import AnthropicStreamParser
from stream_edge.upstream.base import Usage, vendor_usage
from stream_edge.upstream.gemini import GeminiStreamParser
from stream_edge.upstream.openai_chat import OpenAIStreamParser
from tests.test_control_plane import CP, credits_of, data_of, error_of, micro, start_cp, usage_event

D = Decimal
PRICE = Price(D("1"), D("2"), cached_input_per_mtok=D("0.1"), cache_write_per_mtok=D("1.25"))


# --- the arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "price", "cost"),
    [
        (TokenUsage(1000, 500), PRICE, 1000 + 1000),
        # 100 plain + 600 cached + 300 written, 500 out (200 of them reasoning).
        (TokenUsage(1000, 500, 600, 300, 200), PRICE, 100 + 60 + 375 + 1000),
        (TokenUsage(1000, 0, 1000, 0), PRICE, 100),
        (TokenUsage(1000, 0, 0, 1000), PRICE, 1250),
        # Unset cache rates are the input rate: the old formula exactly.
        (TokenUsage(1000, 500, 600, 300), Price(D("1"), D("2")), 2000),
        # One ceiling on the whole sum: 0.3 + 0.7 is 1, not 1 + 1.
        (TokenUsage(2, 0, 1, 0), Price(D("0.3"), D("1"), cached_input_per_mtok=D("0.7")), 1),
        (TokenUsage(1, 0, 1, 0), Price(D("1"), D("1"), cached_input_per_mtok=D("0.000001")), 1),
        (TokenUsage(0, 0), PRICE, 0),
    ],
)  # fmt: skip
def test_each_part_at_its_rate_one_ceiling(usage: TokenUsage, price: Price, cost: int) -> None:
    assert usage_cost_micro(usage, price) == cost


@pytest.mark.parametrize(
    "usage",
    [
        TokenUsage(10, 5, 11, 0),
        TokenUsage(10, 5, 6, 5),
        TokenUsage(10, 5, 0, 0, 6),
        TokenUsage(10, 5, -1, 0),
        TokenUsage(-1, 5),
    ],
)
def test_a_part_bigger_than_its_whole_is_refused(usage: TokenUsage) -> None:
    assert split_problem(usage) is not None
    with pytest.raises(ValueError):
        usage_cost_micro(usage, PRICE)


def test_the_hold_prices_input_at_the_dearest_rate() -> None:
    assert hold_cost_micro(1000, 100, PRICE) == 1250 + 200
    cheap_writes = replace(PRICE, cache_write_per_mtok=D("0.5"))
    assert hold_cost_micro(1000, 100, cheap_writes) == 1000 + 200
    # Whatever split the vendor reports, the charge never exceeds the hold.
    for cached in range(0, 1001, 250):
        for write in range(0, 1001 - cached, 250):
            usage = TokenUsage(1000, 100, cached, write)
            assert usage_cost_micro(usage, PRICE) <= hold_cost_micro(1000, 100, PRICE)


def _exact_ceiling(usage: TokenUsage, price: Price) -> int:
    """The DESIGN's formula in rationals: no decimal context to round anything."""
    uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    exact = (
        uncached * Fraction(price.input_per_mtok)
        + usage.cached_input_tokens * Fraction(price.cached_input_rate)
        + usage.cache_write_tokens * Fraction(price.cache_write_rate)
        + usage.output_tokens * Fraction(price.output_per_mtok)
    )
    return math.ceil(exact)


@pytest.mark.parametrize(
    ("usage", "price"),
    [
        # 10^17 micro-credits of output and one input token at 10^-12: a sum of 30
        # significant digits, which Python's default context (28) rounded to 10^17.
        (TokenUsage(1, 10**9), Price(D("0.000000000001"), D("100000000"))),
        # Prices at the catalog's bounds (10^9, 12 places), counts at a webhook's.
        (TokenUsage(10**9, 10**9, 1, 1), Price(D("999999999.999999999999"), D("0.000000000001"),
                                               cached_input_per_mtok=D("0.000000000003"),
                                               cache_write_per_mtok=D("123456789.123456789123"))),
        (TokenUsage(999_999_999, 1), Price(D("100000000.000000000001"), D("0.000000000001"))),
    ],
)  # fmt: skip
def test_money_is_exact_at_the_bounds_of_prices_and_counts(usage: TokenUsage, price: Price) -> None:
    """DESIGN §9 "Money": exact decimal arithmetic, one ceiling. Before, each product
    and sum was rounded to 28 significant digits (the decimal module's default
    context), so a sum past 10^16 micro-credits lost its fraction: 1 micro-credit
    under the formula, on the charge and on the hold that caps it."""
    exact = _exact_ceiling(usage, price)
    assert usage_cost_micro(usage, price) == exact
    worst = max(price.input_per_mtok, price.cached_input_rate, price.cache_write_rate)
    held = math.ceil(
        usage.input_tokens * Fraction(worst) + usage.output_tokens * Fraction(price.output_per_mtok)
    )
    assert hold_cost_micro(usage.input_tokens, usage.output_tokens, price) == held
    assert charge_for("completed", usage.input_tokens, usage.output_tokens, price, held,
                      cached_input_tokens=usage.cached_input_tokens,
                      cache_write_tokens=usage.cache_write_tokens) == exact  # fmt: skip


def test_charge_for_is_capped_and_free_before_the_first_token() -> None:
    assert charge_for("completed", 1000, 0, PRICE, 10_000, cache_write_tokens=1000) == 1250
    assert charge_for("completed", 1000, 0, PRICE, 1000, cache_write_tokens=1000) == 1000
    assert charge_for("failed", 1000, 0, PRICE, 10_000, cached_input_tokens=5) == 0
    assert charge_for("cancelled", 1000, 1, PRICE, 10_000, cached_input_tokens=1000) == 102


# --- what each vendor reports --------------------------------------------------------------


def _usages(parser: Any, frames: list[bytes]) -> list[Usage]:
    out = [e for f in frames for e in parser.feed(b"data: " + f + b"\n\n")]
    return [e for e in out if isinstance(e, Usage)]


def _details(usage: Usage) -> tuple[int, ...]:
    return usage.counts()


@pytest.mark.parametrize(
    ("parser", "frames", "counts"),
    [
        # OpenAI: prompt_tokens includes the cached ones, completion_tokens the reasoning.
        (OpenAIStreamParser, [b'{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":40,'
                              b'"prompt_tokens_details":{"cached_tokens":64},'
                              b'"completion_tokens_details":{"reasoning_tokens":30}}}'],
         (100, 40, 64, 0, 30)),
        # Anthropic: input_tokens leaves cache reads and writes out.
        (AnthropicStreamParser, [b'{"type":"message_start","message":{"usage":{"input_tokens":10,'
                                 b'"cache_read_input_tokens":80,"cache_creation_input_tokens":20,'
                                 b'"output_tokens":1}}}',
                                 b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},'
                                 b'"usage":{"output_tokens":15}}'],
         (110, 15, 80, 20, 0)),
        # Gemini: promptTokenCount includes the cached ones; thoughts are output too.
        (GeminiStreamParser, [b'{"candidates":[{"content":{"parts":[{"text":"hi"}]},'
                              b'"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":50,'
                              b'"cachedContentTokenCount":32,"candidatesTokenCount":5,'
                              b'"thoughtsTokenCount":12}}'],
         (50, 17, 32, 0, 12)),
        # Hostile or broken figures are kept within their wholes, never negative.
        (OpenAIStreamParser, [b'{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":4,'
                              b'"prompt_tokens_details":{"cached_tokens":999},'
                              b'"completion_tokens_details":{"reasoning_tokens":-7}}}'],
         (10, 4, 10, 0, 0)),
        (AnthropicStreamParser, [b'{"type":"message_start","message":{"usage":{"input_tokens":-50,'
                                 b'"cache_read_input_tokens":true,'
                                 b'"cache_creation_input_tokens":"9","output_tokens":1}}}',
                                 b'{"type":"message_delta","delta":{},"usage":{"output_tokens":3}}'],
         (0, 3, 0, 0, 0)),
        (GeminiStreamParser, [b'{"candidates":[{"content":{"parts":[{"text":"hi"}]},'
                              b'"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":5,'
                              b'"cachedContentTokenCount":40,"candidatesTokenCount":1,'
                              b'"thoughtsTokenCount":2.5}}'],
         (5, 1, 5, 0, 0)),
    ],
)  # fmt: skip
def test_vendor_usage_details(parser: Any, frames: list[bytes], counts: tuple[int, ...]) -> None:
    usages = _usages(parser(), frames)
    assert usages and _details(usages[-1]) == counts
    last = usages[-1]
    assert last.cached_input_tokens + last.cache_write_tokens <= last.input_tokens
    assert last.reasoning_tokens <= last.output_tokens


def test_vendor_usage_clamps_write_after_cached() -> None:
    assert vendor_usage(10, 5, cached=8, cache_write=8).counts() == (10, 5, 8, 2, 0)


# --- the catalog ---------------------------------------------------------------------------


def _catalog(price: dict[str, Any]) -> Any:
    return parse_catalog(
        {
            "default_model": "m",
            "providers": {"p": {"api_type": "openai_chat", "base_url": "https://x"}},
            "models": {"m": {"provider": "p", "context_length": 100, "max_output_tokens": 10,
                             "price": price}},
        }
    )  # fmt: skip


def test_catalog_cache_prices() -> None:
    plain = _catalog({"input_per_mtok": 3, "output_per_mtok": 15}).models["m"]
    assert plain.price.cached_input_rate == plain.price.cache_write_rate == D("3")
    assert plain.public()["price"] == {"input_per_mtok": "3", "output_per_mtok": "15"}
    priced = _catalog({"input_per_mtok": 3, "output_per_mtok": 15, "cached_input_per_mtok": 0.3,
                       "cache_write_per_mtok": "3.75"}).models["m"]  # fmt: skip
    assert (priced.price.cached_input_rate, priced.price.cache_write_rate) == (D("0.3"), D("3.75"))
    assert priced.public()["price"]["cached_input_per_mtok"] == "0.3"
    for bad in ({"cached_input_per_mtok": -1}, {"cache_write_per_mtok": "x"},
                {"cached_input_per_mtok": "1e99"}, {"cache_read_per_mtok": 1}):  # fmt: skip
        with pytest.raises(CatalogError):
            _catalog({"input_per_mtok": 3, "output_per_mtok": 15, **bad})


def test_cache_rates_follow_the_own_key_rule() -> None:
    """An owner on the platform's key cannot make cache reads free; with its own key
    it may, and a partial price override keeps the packaged cache rates."""
    base = _catalog({"input_per_mtok": 3, "output_per_mtok": 15, "cached_input_per_mtok": "0.3",
                     "cache_write_per_mtok": "3.75"})  # fmt: skip
    free = CompanyModel(model_id="m", provider="p", spec={"price": {"cached_input_per_mtok": "0"}})
    platform = company_catalog(base, [free], None)
    assert platform.models["m"].price == base.models["m"].price
    own = company_catalog(base, [free], None, frozenset({"p"}))
    assert own.models["m"].price.cached_input_rate == 0
    assert own.models["m"].price.cache_write_rate == D("3.75")
    cheaper = CompanyModel(model_id="m", provider="p", spec={"price": {"input_per_mtok": "1"}})
    kept = company_catalog(base, [cheaper], None, frozenset({"p"})).models["m"].price
    assert (kept.input_per_mtok, kept.cached_input_rate) == (D("1"), D("0.3"))


# --- the webhook's shape -------------------------------------------------------------------


def _doc(**data: Any) -> dict[str, Any]:
    base = {"jti": "j", "reservation_id": "r", "company_id": "c", "status": "completed",
            "usage_source": "upstream", "input_tokens": 100, "output_tokens": 10}  # fmt: skip
    return {"type": "stream.completed", "data": {**base, **data}}


def test_webhook_details_parse_and_default_to_zero() -> None:
    event = parse_usage_event(_doc())
    assert (event.cached_input_tokens, event.cache_write_tokens, event.reasoning_tokens) == (0,) * 3
    event = parse_usage_event(
        _doc(cached_input_tokens=60, cache_write_tokens=40, reasoning_tokens=10)
    )
    assert (event.cached_input_tokens, event.cache_write_tokens, event.reasoning_tokens) == (
        60,
        40,
        10,
    )
    body = orjson.loads(event.body())["data"]
    assert (body["cached_input_tokens"], body["cache_write_tokens"], body["reasoning_tokens"]) == (
        60,
        40,
        10,
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cached_input_tokens": 101}, "data.cached_input_tokens"),
        ({"cached_input_tokens": 60, "cache_write_tokens": 41}, "data.cached_input_tokens"),
        ({"reasoning_tokens": 11}, "data.reasoning_tokens"),
        ({"cached_input_tokens": -1}, "data.cached_input_tokens"),
        ({"cache_write_tokens": "5"}, "data.cache_write_tokens"),
        ({"reasoning_tokens": True}, "data.reasoning_tokens"),
        ({"cached_input_tokens": 10**12}, "data.cached_input_tokens"),
    ],
)
def test_webhook_details_that_cannot_be_are_refused(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_usage_event(_doc(**data))
    assert info.value.field == field


# --- through a control plane -----------------------------------------------------------------

CATALOG = {
    "default_model": "cached-model",
    "providers": {"mock": {"api_type": "openai_chat", "base_url": "http://127.0.0.1:9/v1"}},
    "models": {
        "cached-model": {
            "provider": "mock",
            "context_length": 100_000,
            "max_output_tokens": 1000,
            "price": {"input_per_mtok": "1", "output_per_mtok": "2",
                      "cached_input_per_mtok": "0.1", "cache_write_per_mtok": "1.25"},
        }
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def cp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    tmp_path = tmp_path_factory.mktemp("cache-prices")
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(CATALOG))
    with start_cp(request, tmp_path, "sqlite", {"LLMGW_MODELS_FILE": str(models)}) as handle:
        yield handle


def _estimate(cp: CP, reservation_id: str) -> int:
    db = cp.app.state.db

    def read(session: Any) -> int:
        return int(
            session.scalar(
                select(col(Reservation.input_estimate)).where(col(Reservation.id) == reservation_id)
            )
        )

    estimate: int = cp.on_loop(lambda: db.transaction(read))
    return estimate


def _usage_item(client: Any, reservation_id: str) -> dict[str, Any]:
    items = data_of(client.get("/v1/usage", params={"limit": 200}))["items"]
    found: dict[str, Any] = next(i for i in items if i["reservation_id"] == reservation_id)
    return found


def test_the_hold_covers_an_input_written_to_the_cache(cp: CP) -> None:
    client, company_id = cp.owner_client()
    init = data_of(client.post("/v1/chat/init", json={"query": "hello", "max_tokens": 100}), 201)
    estimate = _estimate(cp, init["reservation_id"])
    assert micro(init["reserved_credits"]) == math.ceil(estimate * D("1.25") + 100 * 2)
    # The worst the vendor can report: every input token written to the cache.
    event = usage_event(
        init, company_id, input_tokens=estimate, output_tokens=100, cache_write_tokens=estimate
    )
    assert cp.webhook(event).status_code == 200
    item = _usage_item(client, init["reservation_id"])
    assert micro(item["cost"]) == math.ceil(estimate * D("1.25") + 100 * 2)  # not capped


def test_each_part_of_the_usage_is_charged_at_its_rate(cp: CP) -> None:
    client, company_id = cp.owner_client()
    init = data_of(client.post("/v1/chat/init", json={"query": "x " * 999, "max_tokens": 500}), 201)
    before = micro(credits_of(client)["balance"])
    event = usage_event(init, company_id, input_tokens=1000, output_tokens=500,
                        cached_input_tokens=600, cache_write_tokens=300,
                        reasoning_tokens=200)  # fmt: skip
    assert cp.webhook(event).status_code == 200
    item = _usage_item(client, init["reservation_id"])
    assert (item["input_tokens"], item["output_tokens"]) == (1000, 500)
    assert (item["cached_input_tokens"], item["cache_write_tokens"], item["reasoning_tokens"]) == (
        600,
        300,
        200,
    )
    cost = 100 * 1 + 600 * D("0.1") + 300 * D("1.25") + 500 * 2
    assert micro(item["cost"]) == math.ceil(cost) == 1535
    assert before - micro(credits_of(client)["balance"]) == 1535


def test_a_webhook_without_details_prices_all_input_as_input(cp: CP) -> None:
    client, company_id = cp.owner_client()
    init = data_of(client.post("/v1/chat/init", json={"query": "x" * 300, "max_tokens": 50}), 201)
    event = usage_event(init, company_id, input_tokens=90, output_tokens=50)
    data = orjson.loads(event.body())["data"]
    for name in ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens"):
        del data[name]  # an older edge, or a backend posting its own events
    body = orjson.dumps({"type": "stream.completed", "timestamp": "2026-11-30T00:00:00Z",
                         "data": data})  # fmt: skip
    secret = cp.settings.webhook_secret.reveal()
    response = cp.client().post(
        "/v1/webhooks/usage", content=body, headers=sign(secret, event.webhook_id, body)
    )
    assert response.status_code == 200, response.text
    item = _usage_item(client, init["reservation_id"])
    assert (item["cached_input_tokens"], item["cache_write_tokens"], item["reasoning_tokens"]) == (
        0,
        0,
        0,
    )
    assert micro(item["cost"]) == 90 + 100


def test_a_split_bigger_than_its_whole_is_refused_and_changes_nothing(cp: CP) -> None:
    """An edge or backend claiming more cached tokens than input would make the
    uncached remainder negative (a charge below the cache price, or below 0)."""
    client, company_id = cp.owner_client()
    init = data_of(client.post("/v1/chat/init", json={"query": "x" * 300, "max_tokens": 50}), 201)
    before = credits_of(client)
    for changes in ({"cached_input_tokens": 10**6}, {"cached_input_tokens": 80,
                    "cache_write_tokens": 80}, {"reasoning_tokens": 51}):  # fmt: skip
        event: UsageEvent = usage_event(
            init, company_id, input_tokens=100, output_tokens=50, **changes
        )
        message = error_of(cp.webhook(event), 422, "validation_error")
        assert "tokens" in message
    assert credits_of(client) == before
    items = data_of(client.get("/v1/usage"))["items"]
    assert not [i for i in items if i["reservation_id"] == init["reservation_id"]]
    # The honest report still settles it.
    event = usage_event(init, company_id, input_tokens=100, output_tokens=50,
                        cached_input_tokens=100)  # fmt: skip
    assert cp.webhook(event).status_code == 200
    assert micro(_usage_item(client, init["reservation_id"])["cost"]) == 10 + 100


def test_packaged_catalog_still_loads() -> None:
    assert load_catalog(None).models["mock-fast"].price.cached_input_rate == D("1.0")
