"""The packaged catalog plus one OpenAI-compatible provider and model of a test's own
(a hostile or unusual backend on the test's socket), written for `LLMGW_MODELS_FILE`."""

from __future__ import annotations

from pathlib import Path

import yaml

PACKAGED = Path(__file__).parent.parent / "shared" / "models.yaml"


def catalog_with_backend(
    directory: Path, provider: str, backend_url: str, *, context_length: int, max_output_tokens: int
) -> str:
    """Write the catalog to `directory` and return its path: `provider` on
    `backend_url` serves `<provider>-model`, streaming only, at 1 / 2 per million."""
    doc = yaml.safe_load(PACKAGED.read_text())
    doc["providers"][provider] = {"api_type": "openai_chat", "base_url": f"{backend_url}/v1"}
    doc["models"][f"{provider}-model"] = {
        "provider": provider,
        "upstream_model": f"{provider}-model",
        "context_length": context_length,
        "max_output_tokens": max_output_tokens,
        "features": ["streaming"],
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    }
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)
