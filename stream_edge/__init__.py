"""The stream edge: verifies stream tokens with public keys only and relays the
LLM backend's tokens to the client as they arrive, then reports usage."""
