"""Code both services import: settings, catalog and pricing, token claims, webhook
signing, SSE encoding/parsing, and the hot-state store interface."""
