#!/usr/bin/env bash
# Print a deploy/.env with fresh secrets for deploy/compose.yaml:
#   deploy/gen-env.sh > deploy/.env && chmod 600 deploy/.env
# Keep the file: LLMGW_ENCRYPTION_KEY decrypts the signing keys stored in the database,
# and a new LLMGW_WEBHOOK_SECRET must reach every edge and control plane together
# (docs/operations.md, "Rotating secrets").
set -euo pipefail
python3 - <<'PY'
import base64, secrets
print("POSTGRES_PASSWORD=" + secrets.token_urlsafe(24))
print("LLMGW_WEBHOOK_SECRET=whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
print("LLMGW_ENCRYPTION_KEY=" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
print("LLMGW_ADMIN_TOKEN=" + secrets.token_urlsafe(32))
print("GRAFANA_ADMIN_PASSWORD=" + secrets.token_urlsafe(16))
print("LLMGW_EDGE_PUBLIC_URL=http://127.0.0.1:8001")
print("# Platform-owned upstream keys, when you use those providers:")
for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY"):
    print(f"{name}=")
PY
