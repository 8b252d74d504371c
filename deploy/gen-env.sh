#!/usr/bin/env bash
# Print a deploy/.env with fresh secrets for deploy/compose.yaml:
#   deploy/gen-env.sh > deploy/.env && chmod 600 deploy/.env
# Keep the file: LLMGW_ENCRYPTION_KEY decrypts the signing keys stored in the database,
# and a new LLMGW_WEBHOOK_SECRET must reach every edge and control plane together
# (docs/operations.md, "Rotating secrets").
set -euo pipefail
python3 - <<'PY'
import base64, hashlib, hmac, secrets
print("POSTGRES_PASSWORD=" + secrets.token_urlsafe(24))
# Redis asks for it (compose: `--requirepass`); URL-safe, as it sits in LLMGW_REDIS_URL.
print("REDIS_PASSWORD=" + secrets.token_urlsafe(24))
print("LLMGW_WEBHOOK_SECRET=whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
# Signs the edge's calls for API-key callers to the control plane (both services).
print("LLMGW_EDGE_SERVICE_SECRET=whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
encryption_key = secrets.token_bytes(32)
print("LLMGW_ENCRYPTION_KEY=" + base64.urlsafe_b64encode(encryption_key).decode())
# The edge gets only the sub-key that opens the sealed `upr` claim, not the ring that
# also protects the database's secrets: HKDF-SHA256 (RFC 5869), no salt, the same
# info as shared/route_claim.py (`llm-gateway admin route-key` prints the same).
prk = hmac.new(b"\0" * 32, encryption_key, hashlib.sha256).digest()
okm = hmac.new(prk, b"llm-gateway upstream route v2" + b"\x01", hashlib.sha256).digest()
print("LLMGW_ROUTE_KEY=" + base64.urlsafe_b64encode(okm).decode())
print("LLMGW_ADMIN_TOKEN=" + secrets.token_urlsafe(32))
print("GRAFANA_ADMIN_PASSWORD=" + secrets.token_urlsafe(16))
print("LLMGW_EDGE_PUBLIC_URL=http://127.0.0.1:8001")
print("# Platform-owned upstream keys, when you use those providers:")
for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY"):
    print(f"{name}=")
PY
