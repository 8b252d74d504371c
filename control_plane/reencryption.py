"""Re-encrypt every stored secret under the newest ``LLMGW_ENCRYPTION_KEY``
(``POST /v1/admin/encryption-keys/rotate``), so the older Fernet keys can then be
removed from it: companies' provider keys (`company_llm`), their webhook secrets
(`company_webhooks`) and the signing keys (`signing_keys`), each re-encrypted by
the module that owns its table, in the caller's one transaction."""

from __future__ import annotations

from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy.orm import Session

from control_plane import audit, company_llm, company_webhooks, signing_keys


def reencrypt_all(session: Session, fernet: MultiFernet) -> company_llm.Rotated:
    """What was re-encrypted; `failed` names the secrets no configured key opens
    (they are left as they are)."""
    result = company_llm.Rotated()
    company_llm.rotate_provider_keys(session, fernet, result)
    _, failed = company_webhooks.rotate_secrets(session, fernet)
    result.failed.extend(failed)
    result.signing_keys, failed = signing_keys.reencrypt_private_keys(session, fernet)
    result.failed.extend(failed)
    return result


def rotate_and_audit(
    session: Session, fernet: MultiFernet, *, actor: str, request_id: str | None
) -> dict[str, Any]:
    """`reencrypt_all`, recorded in the audit log; the counts the admin is answered."""
    result = reencrypt_all(session, fernet)
    counts = {
        "provider_keys": result.provider_keys,
        "signing_keys": result.signing_keys,
        "failed": result.failed,
    }
    audit.record_admin(
        session,
        actor=actor,
        action=audit.ENCRYPTION_ROTATE,
        company_id=None,
        target="encryption_keys",
        request_id=request_id,
        after=counts,
    )
    return counts
