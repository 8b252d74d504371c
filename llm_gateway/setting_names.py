"""Every `LLMGW_*` variable some llm-gateway process reads, and the ones an
environment sets that none reads: a misspelling (`LLMGW_MAX_STREAMS_PER_USR`), a
variable of another version. Such a variable was ignored without a word, so the
operator believed a limit or a timeout in force that was the default.

Warned about, not refused: an environment shared with other tools, or kept from an
older version, may hold names of ours no process reads, and those start today.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterable, Iterator, Mapping

from shared.catalog import Catalog, free_on_platform_key

log = logging.getLogger("llmgw.settings")

PREFIX = "LLMGW_"
# Read outside the services' settings objects: logging (`shared.logs`, the CLI) and
# the chat CLI's key.
OUTSIDE_SETTINGS = frozenset({"LLMGW_LOG_LEVEL", "LLMGW_LOG_FORMAT", "LLMGW_API_KEY"})
# Read by the test suite and tools around the services; a developer's shell has them.
TOOLING = frozenset({"LLMGW_TEST_PG_DSN", "LLMGW_TEST_REDIS_URL"})


class Recording(Mapping[str, str]):
    """An environment that notes every name looked up in it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return self._env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def settings_lookups() -> tuple[set[str], set[str]]:
    """The names the control plane's and the edge's settings look up, found by
    building each from a recording environment (each `from_env` looks every name up,
    set or not, so the defaults are enough)."""
    from control_plane.settings import ControlPlaneSettings
    from shared.webhooks import generate_secret
    from stream_edge.settings import EdgeSettings

    env = {"LLMGW_WEBHOOK_SECRET": generate_secret()}
    cp, edge = Recording(env), Recording(env)
    ControlPlaneSettings.from_env(cp)
    EdgeSettings.from_env(edge)
    return cp.read, edge.read


@functools.cache
def known_names() -> frozenset[str]:
    """Every `LLMGW_*` name some llm-gateway process reads."""
    cp, edge = settings_lookups()
    read = {name for name in cp | edge if name.startswith(PREFIX)}
    return frozenset(read | OUTSIDE_SETTINGS | TOOLING)


def catalog_names(catalog: Catalog) -> set[str]:
    """The key variables a catalog names (any name, `LLMGW_…` ones included)."""
    names: set[str] = set()
    for provider in catalog.providers.values():
        names.update(provider.key_envs())
        if provider.service_token_env:
            names.add(provider.service_token_env)
    return names


def unknown_settings(env: Iterable[str], also_known: Iterable[str] = ()) -> list[str]:
    """One line per `LLMGW_*` name in `env` that no process reads, with the closest
    name that one does when there is one (never the value: it may be a secret)."""
    known = known_names() | set(also_known)
    lines = []
    for name in sorted(n for n in env if n.startswith(PREFIX) and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else "; remove it or fix its name"
        lines.append(f"{name} is set but no llm-gateway process reads it: it is ignored{hint}")
    return lines


def warn_misconfiguration(env: Mapping[str, str], catalog: Catalog) -> list[str]:
    """Log (WARNING) at start each `LLMGW_*` variable of `env` nothing reads, and each
    model free on a key the platform pays for; the lines logged."""
    lines = unknown_settings(env, catalog_names(catalog)) + free_on_platform_key(catalog)
    for line in lines:
        log.warning(line)
    return lines
