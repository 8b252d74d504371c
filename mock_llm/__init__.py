"""A stand-in OpenAI-compatible LLM backend with scriptable timing and failures."""
