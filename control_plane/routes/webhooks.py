"""``POST /v1/webhooks/usage``: verify the Standard Webhooks signature, then settle."""

from __future__ import annotations

import functools
import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import late_settlements
from control_plane.background import finish
from control_plane.chat_sessions import SessionLimits
from control_plane.deps import get_deps, read_body
from control_plane.errors import (
    AppError,
    InvalidSignature,
    TimestampOutOfWindow,
    ValidationFailed,
)
from control_plane.middleware import request_id
from control_plane.responses import ok
from control_plane.usage_events import parse_usage_event
from control_plane.validation import parse_json_object
from control_plane.webhook_settlement import Delivery, settle_delivery
from shared.pricing import format_credits
from shared.webhooks import MAX_USAGE_BODY_BYTES, BadSignature, StaleTimestamp, verify_signer

log = logging.getLogger("control_plane.webhooks")

MAX_WEBHOOK_ID = 200


async def usage_webhook(request: Request) -> Response:
    deps = get_deps(request)
    outcome = "error"
    try:
        body = await read_body(request, MAX_USAGE_BODY_BYTES)
        settings = deps.settings
        backends = {
            provider: [s.reveal() for s in group]
            for provider, group in settings.backend_webhook_secrets.items()
        }
        try:
            # None: the edge (platform secret); else the backend whose own secret signed.
            signer = verify_signer(
                [s.reveal() for s in settings.webhook_secrets],
                backends,
                body,
                dict(request.headers),
            )
        except StaleTimestamp as exc:  # our secret, another clock: the sender may retry
            raise TimestampOutOfWindow(exc.server_time) from None
        except BadSignature:
            raise InvalidSignature() from None
        # A model's reply may hold anything, NUL included: it is made storable, not
        # refused, so the usage always settles (`webhook_settlement.append_transcripts`).
        event = parse_usage_event(parse_json_object(body, allow_nul=True))
        webhook_id = request.headers["webhook-id"]  # present: the signature covers it
        if len(webhook_id) > MAX_WEBHOOK_ID:
            raise ValidationFailed("webhook-id", f"must be at most {MAX_WEBHOOK_ID} characters")
        delivery = Delivery(
            webhook_id,
            event,
            transcripts=settings.store_transcripts,
            http_request_id=request_id(request),
            signer_provider=signer,
            session_limits=SessionLimits(
                deps.settings.max_session_messages, deps.settings.max_session_bytes
            ),
        )
        # What the commit implies, should it come after this webhook's 503: the
        # redelivery is then a duplicate, which counts nothing (`late_settlements`).
        late = functools.partial(late_settlements.late, deps, event)
        if deps.settler is not None:  # with the webhooks that arrive meanwhile
            result = await deps.settler.settle(delivery, late)
        else:
            result = await settle_delivery(deps.db, delivery, late)
        # Committed: what follows is bookkeeping, which a request cancelled from
        # here on (the server's shutdown) must not lose. The money is counted at
        # once; the store's part runs to its end (`background.finish`).
        outcome = "duplicate" if result.duplicate else "settled"
        if not result.duplicate:
            late_settlements.count(deps, result)
        await finish(late_settlements.after_commit(deps, event, result), "settled-webhook")
        if result.duplicate:
            return ok({"duplicate": True})
        late_settlements.observe_lag(deps, event)
        return ok({"settled": True, "charged": format_credits(result.charged_micro)})
    except AppError as exc:
        outcome = exc.code
        log.warning("usage webhook refused: %s (%s)", exc.code, exc.message)
        raise
    finally:
        deps.metrics.webhooks.labels(outcome=outcome).inc()


routes: list[BaseRoute] = [Route("/v1/webhooks/usage", usage_webhook, methods=["POST"])]
