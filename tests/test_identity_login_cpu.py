"""Password hashing cannot starve the money path: an account's sign-ins are
limited per minute (``LLMGW_LOGIN_RATE_PER_ACCOUNT``: 429 `too_many_logins` before
argon2), and a process runs a few password checks at once behind a short queue,
answering 503 `logins_busy` with ``Retry-After`` past it instead of queueing without
bound (`control_plane/password_checks.py`).

Before: a member looping its own login with the right password was never refused,
each attempt a ~200 ms, 64 MiB argon2 verify; 150 logins at once queued in the
default executor and took 35 s to drain, a real login waiting 13 s behind them
(`bench/login_load.py`, 2 CPUs).

A real control plane per test (SQLite + in-memory store), with a fixed clock; slow
verifies are a fake verifier held by a gate, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import login_limits
from control_plane.password_checks import PasswordChecks, login_owner
from control_plane.rate_limits import window_at
from control_plane.routes import account
from tests.polling import wait_until
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.test_control_plane import ADMIN_TOKEN, PASSWORD
from tests.test_identity_login_limits import NOW, Login, _login, login_server

# Their subject is the cost of the real argon2 (tests/conftest.py).
pytestmark = pytest.mark.real_password_hashes

__all__ = ["private_postgres"]  # the fixture, used by name

RATE = 4
FAILURES = 100  # out of the way: the per-minute limit is what is tested here


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Login]:
    extra = {
        "LLMGW_LOGIN_RATE_PER_ACCOUNT": str(RATE),
        "LLMGW_LOGIN_FAILURES_PER_15MIN": str(FAILURES),
    }
    with login_server(f"sqlite:///{tmp_path}/cp.db", extra, None) as server:
        yield server


def _counter(server: Login, key: str) -> int:
    async def read() -> bytes | None:
        return await server.app.state.store.get(key)  # type: ignore[no-any-return]

    return int(server.group.call(read) or 0)


def _failures_of(server: Login, email: str, address: str) -> tuple[int, int]:
    window = window_at(NOW, login_limits.WINDOW_SECONDS)
    email_key, address_key = login_limits.attempt_keys(email, address, window)
    return _counter(server, email_key), _counter(server, address_key)


def test_a_member_looping_its_own_login_is_refused_past_the_limit_before_argon2(
    server: Login,
) -> None:
    email = server.user()
    with server.client("127.0.0.2") as looper:
        for _ in range(RATE):
            assert _login(looper, email, PASSWORD).status_code == 200
        verified = len(server.verifies)
        r = _login(looper, email, PASSWORD)
        assert r.status_code == 429, r.text
        body = r.json()
        assert body["success"] is False and body["error"]["code"] == "too_many_logins"
        assert r.headers["retry-after"] == "30"  # the rest of the minute at NOW
        assert len(server.verifies) == verified  # no argon2 for a refused login
        # A refused login is no failure: the address and the email count none.
        assert _failures_of(server, email, "127.0.0.2") == (0, 0)
        # The same address signs another account in.
        assert _login(looper, server.user(), PASSWORD).status_code == 200


@contextlib.contextmanager
def _verify_held(
    then: Callable[[str | None, str], bool] = lambda password_hash, password: False,
) -> Iterator[tuple[list[str], Callable[[], None]]]:
    """While inside, each password check (`account.verify_password`) notes the
    password typed and waits, until the function yielded beside those passwords is
    called (then it answers as `then`); on the way out none waits any more."""
    gate = threading.Event()
    entered: list[str] = []

    def held_verify(password_hash: str | None, password: str) -> bool:
        entered.append(password)
        gate.wait()
        return then(password_hash, password)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(account, "verify_password", held_verify)
        try:
            yield entered, gate.set
        finally:
            gate.set()


def test_wrong_passwords_and_unknown_emails_are_failures_not_sign_ins(server: Login) -> None:
    """Counted per email as sent, before the lookup, and taken back when the password
    is wrong: an account's wrong passwords and an unknown email's get the same answers
    at the same counts (the failure limit's, whatever it is set to), and a looping
    guesser cannot spend the account's sign-ins."""
    answers = []
    emails = (server.user(), f"nobody-{uuid.uuid4().hex}@example.com")
    for email in emails:
        with server.client("127.0.0.3") as client:
            seen = [_login(client, email, "wrong") for _ in range(RATE * 3)]
        answers.append([(r.status_code, r.json(), r.headers.get("retry-after")) for r in seen])
        assert _counter(server, login_limits.rate_key(email, window_at(NOW, 60))) == 0
    assert answers[0] == answers[1]
    assert [status for status, _, _ in answers[0]] == [401] * (RATE * 3)
    # The account still signs in, its minute untouched by the guesses.
    with server.client("127.0.0.6") as owner:
        assert _login(owner, emails[0], PASSWORD).status_code == 200


def test_with_every_check_place_taken_the_next_login_is_a_fast_503(server: Login) -> None:
    """One check running (held in a fake verify), one waiting: the third login is
    refused at once, without a lookup or a verify, and counts nowhere; the two
    held logins then finish."""
    checks = PasswordChecks(slots=1, waiting=1)
    server.app.state.deps.password_checks = checks
    emails = [server.user(), server.user()]
    third = server.user()
    with (
        _verify_held() as (entered, release),
        ThreadPoolExecutor(2) as pool,
        server.client("127.0.0.4") as held,
        server.client("127.0.0.9") as held_too,  # an owner holds one of the two places
        server.client("127.0.0.5") as probe,
    ):
        try:
            pending = [
                pool.submit(_login, client, e, "wrong")
                for client, e in zip((held, held_too), emails, strict=True)
            ]
            wait_until(
                lambda: len(entered) == 1 and checks.inside == 2,
                "one login's check runs and another waits for it",
            )
            r = _login(probe, third, "wrong")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["success"] is False and body["error"]["code"] == "logins_busy"
            assert r.headers["retry-after"] == "1"
            assert len(entered) == 1  # the refused login reached no verify
            # Nothing was checked: it counts as no failure and no login of the account.
            assert _failures_of(server, third, "127.0.0.5") == (0, 0)
            rate_key = login_limits.rate_key(third, window_at(NOW, 60))
            assert _counter(server, rate_key) == 0
        finally:
            release()
        assert [f.result().status_code for f in pending] == [401, 401]
    assert checks.inside == 0
    assert len(entered) == 2


def test_a_login_the_database_fails_before_its_check_counts_nowhere(
    private_postgres: PrivatePostgres,
) -> None:
    """PostgreSQL goes away: the account's lookup fails (503) and no password was
    checked, so the attempt counts neither as a failure nor as a sign-in of the
    account, as a `logins_busy` one. Before, each such 503 spent a failure and a
    sign-in: a user retrying through a database blip was locked out once it was back."""
    extra = {
        "LLMGW_LOGIN_RATE_PER_ACCOUNT": str(RATE),
        "LLMGW_LOGIN_FAILURES_PER_15MIN": str(RATE),
    }
    with login_server(private_postgres.new_database(), extra, None) as server:
        email = server.user()
        private_postgres.stop()
        try:
            with server.client("127.0.0.7") as client:
                for _ in range(RATE + 1):
                    r = _login(client, email, PASSWORD)
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "database_unavailable"
        finally:
            private_postgres.start()
        assert _failures_of(server, email, "127.0.0.7") == (0, 0)
        assert _counter(server, login_limits.rate_key(email, window_at(NOW, 60))) == 0
        assert server.app.state.deps.password_checks.inside == 0
        with server.client("127.0.0.7") as client:
            assert _login(client, email, PASSWORD).status_code == 200


async def test_a_cancelled_check_keeps_its_slot_until_its_thread_is_done() -> None:
    """Hashing cannot be stopped from the loop: a caller that leaves must not free
    its slot while its argon2 still runs, or more than `slots` would run at once."""
    checks = PasswordChecks(slots=1, waiting=0)
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait()
        return "done"

    caller = asyncio.create_task(checks.run(slow))
    await asyncio.to_thread(started.wait)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert checks.running == 1  # its argon2 still runs: the slot stays taken
    ran: list[str] = []
    # Another company's (the first's owner is at its share of one place).
    second = asyncio.create_task(
        checks.run(lambda: ran.append("second") or "second", owner="another")
    )
    for _ in range(5):  # loop turns and a thread hop: a free slot would have run it
        await asyncio.sleep(0)
        await asyncio.to_thread(lambda: None)
    assert not ran and not second.done()
    release.set()
    assert await second == "second"
    assert checks.running == 0


def _company_users(
    server: Login, passwords: list[str], domain: str | None = None, *, own_domains: bool = False
) -> tuple[str, list[str]]:
    """A new company with one user per password, their emails at `domain` (by default
    one of the company's own; `own_domains`: one domain each, as an owner may give
    its members): its id and their emails."""
    company_domain = domain or f"c-{uuid.uuid4().hex[:8]}.example"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=30) as admin:
        r = admin.post("/v1/admin/companies", json={"name": uuid.uuid4().hex}, headers=headers)
        company_id = r.json()["data"]["id"]
        emails = []
        for password in passwords:
            domain = f"d-{uuid.uuid4().hex[:8]}.example" if own_domains else company_domain
            email = f"t-{uuid.uuid4().hex[:10]}@{domain}"
            body = {"company_id": company_id, "email": email, "password": password}
            r = admin.post("/v1/admin/users", json=body, headers=headers)
            assert r.status_code == 201, r.text
            emails.append(email)
    return company_id, emails


def test_one_companys_members_cannot_take_every_check_place_from_another_company(
    server: Login,
) -> None:
    """Company A's members log in with their right passwords, each far inside its own
    per-account rate, as many at once as a process has places for password checks.
    Before: every place was A's, and company B's member was refused 503 `logins_busy`
    at every try (measured with the real argon2 on 2 CPUs, 40 members of A looping:
    B 15 of 15 logins 503, B alone 0.3 s each). Now A holds at most half of the
    places (its next login is the fast 503), and the checks run in turns by the
    client's address (A's members sign in from one host), so B's check runs next,
    before A's queued ones."""
    checks = PasswordChecks(slots=1, waiting=3)
    a_passwords = [f"a-password-{i}" for i in range(4)]
    _, a_emails = _company_users(server, a_passwords)
    _, [b_email] = _company_users(server, ["b-password-0"])
    server.app.state.deps.password_checks = checks
    lookups: list[str] = []
    real_lookup = account.find_user_signing_in

    def counting_lookup(session: Any, typed: str) -> Any:
        lookups.append(typed)
        return real_lookup(session, typed)

    with (
        pytest.MonkeyPatch.context() as patch,
        _verify_held(account.verify_password) as (entered, release),
        ThreadPoolExecutor(5) as pool,
        server.client("127.0.0.11") as a_client,
        server.client("127.0.0.12") as b_client,
    ):
        patch.setattr(account, "find_user_signing_in", counting_lookup)
        try:
            # One after the other, each settled (its check queued, or an answer)
            # before the next: the first's check runs, held; the others queue behind.
            a_logins: list[Future[httpx.Response]] = []
            for email, password in zip(a_emails, a_passwords, strict=True):
                login = pool.submit(_login, a_client, email, password)
                a_logins.append(login)
                queued = len(a_logins) - sum(f.done() for f in a_logins)
                wait_until(
                    lambda login=login, queued=queued: (
                        login.done() or checks.owned(login_owner("127.0.0.11")) == queued
                    ),
                    "A's login has its check queued or an answer",
                )
            b_login = pool.submit(_login, b_client, b_email, "b-password-0")
            # Its check queued (not only its place taken: its lookup runs first), or
            # an answer: before, A's first check could end while B's lookup still ran,
            # and A's queued check was the only one waiting.
            wait_until(
                lambda: b_login.done() or checks.owned(login_owner("127.0.0.12")) == 1,
                "B's login has its check queued or an answer",
            )
            assert not b_login.done(), f"B refused while A held the places: {b_login.result().text}"
            # A member of A refused at A's share retries: refused before the counters
            # and the lookup, so A's retries hold no place the others need.
            [refused] = [e for e, f in zip(a_emails, a_logins, strict=True) if f.done()][:1]
            seen = len(lookups)
            r = _login(a_client, refused, a_passwords[a_emails.index(refused)])
            assert (r.status_code, r.json()["error"]["code"]) == (503, "logins_busy")
            assert len(lookups) == seen
        finally:
            release()
        assert b_login.result().status_code == 200
        answers = sorted(f.result().status_code for f in a_logins)
    assert answers == [200, 200, 503, 503]  # A: half of the 4 places
    # One check at a time: A's first was running; B's ran next, before A's queued one.
    assert entered == [entered[0], "b-password-0", entered[2]]
    assert {entered[0], entered[2]} < set(a_passwords)
    assert checks.inside == 0


def test_the_check_shares_never_tell_which_emails_have_an_account(server: Login) -> None:
    """An anonymous prober fills one share of the checks with logins of unknown
    emails, then tries an email: whether it has an account must not change what it
    gets. Before: shares were by the user's company, looked up first, and unknown
    emails were all one owner's, so with that owner at its share an unknown email was
    503 `logins_busy` at once while a real account's (its company below its share)
    was checked (measured: 503 against 401). Now the share is the client's address,
    read from the connection, the same for an account and for no account, from the
    flooding address (both 503) and from another (both checked)."""
    checks = PasswordChecks(slots=1, waiting=3)  # a share of 2
    _, [known] = _company_users(server, ["k-password-0"], domain="victim.example")
    server.app.state.deps.password_checks = checks

    def probe(email: str, client: httpx.Client) -> str:
        """What `email`'s login gets at once: an answer, or a place in the checks."""
        inside = checks.inside
        login = pool.submit(_login, client, email, "guess")
        wait_until(lambda: login.done() or checks.inside > inside, "an answer or a place")
        return str(login.result().status_code) if login.done() else "checked"

    with (
        _verify_held() as (_, release),
        ThreadPoolExecutor(6) as pool,
        server.client("127.0.0.21") as prober,
        server.client("127.0.0.22") as elsewhere,
    ):
        try:
            flood = [
                pool.submit(_login, prober, f"nobody-{i}@victim.example", "guess") for i in range(2)
            ]
            wait_until(lambda: checks.inside == 2, "the flood holds two places")
            emails = (known, "nobody-else@victim.example")
            answers = {email: probe(email, prober) for email in emails}
            elsewhere_answers = {email: probe(email, elsewhere) for email in emails}
        finally:
            release()
        assert [f.result().status_code for f in flood] == [401, 401]
    # The account's email and the unknown one get the same answer: the flooding
    # address's share is full; another address's is not.
    assert answers[known] == answers["nobody-else@victim.example"] == "503", answers
    assert set(elsewhere_answers.values()) == {"checked"}, elsewhere_answers


@pytest.mark.parametrize("members_at", ["the victim's domain", "a domain each"])
def test_a_companys_owner_cannot_choose_its_members_domains_to_take_anothers_places(
    server: Login, members_at: str
) -> None:
    """An owner creates its members with emails at any domain it likes, then signs
    them in with their right passwords from one host (successes count as no failure,
    each far inside its per-account rate). With the checks' shares by the typed
    email's domain, members at the victim company's domain held that domain's share,
    and members at a domain each took every place: the victim's member was 503
    `logins_busy` at once, at every try, as before the shares (measured, one slot and
    three places: 503 in both cases). Now the share is the client's address: the
    owner's host holds at most its half, and the victim's member is checked."""
    checks = PasswordChecks(slots=1, waiting=3)  # a share of 2
    _, [victim] = _company_users(server, ["v-password-0"], domain="victim.example")
    passwords = [f"m-password-{i}" for i in range(4)]
    if members_at == "the victim's domain":
        _, members = _company_users(server, passwords, domain="victim.example")
    else:
        _, members = _company_users(server, passwords, own_domains=True)
    server.app.state.deps.password_checks = checks
    with (
        _verify_held(account.verify_password) as (_, release),
        ThreadPoolExecutor(6) as pool,
        server.client("127.0.0.31") as owner_host,
        server.client("127.0.0.32") as victim_host,
    ):
        try:
            logins = []
            for email, password in zip(members, passwords, strict=True):
                inside = checks.inside
                logins.append(pool.submit(_login, owner_host, email, password))
                wait_until(
                    lambda login=logins[-1], inside=inside: login.done() or checks.inside > inside,
                    "the member's login has a place or an answer",
                )
            inside = checks.inside
            victim_login = pool.submit(_login, victim_host, victim, "v-password-0")
            wait_until(
                lambda: victim_login.done() or checks.inside > inside,
                "the victim's login has a place or an answer",
            )
            assert not victim_login.done(), (
                f"the victim refused: {victim_login.result().status_code}"
                f" {victim_login.result().text}"
            )
        finally:
            release()
        assert victim_login.result().status_code == 200
        assert sorted(f.result().status_code for f in logins) == [200, 200, 503, 503]
    assert checks.inside == 0


async def test_checks_take_turns_by_owner_and_a_cancelled_waiter_passes_its_turn() -> None:
    """One slot: A's three checks queued before B's and C's do not run before them;
    a waiter cancelled in line (B's first) is skipped, its owner's next keeps its turn."""
    checks = PasswordChecks(slots=1, waiting=20)
    gate = threading.Event()
    ran: list[str] = []

    def check(name: str) -> str:
        gate.wait()
        ran.append(name)
        return name

    first = asyncio.create_task(checks.run(check, "a1", owner="a"))
    await wait_async(lambda: checks.running == 1)
    queued = [
        asyncio.create_task(checks.run(check, name, owner=name[0]))
        for name in ("a2", "a3", "a4", "b1", "b2", "c1")
    ]
    for _ in range(3):
        await asyncio.sleep(0)
    queued[3].cancel()  # b1 leaves the line
    gate.set()
    assert await asyncio.gather(first, *queued[:3], *queued[4:]) == [
        "a1",
        "a2",
        "a3",
        "a4",
        "b2",
        "c1",
    ]
    with pytest.raises(asyncio.CancelledError):
        await queued[3]
    assert ran == ["a1", "b2", "c1", "a2", "a3", "a4"]
    assert checks.running == 0 and not any(checks.owned(o) for o in "abc")
    assert checks._turns._latest == {}  # nothing kept for owners gone
    assert checks.share == 10


async def wait_async(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.to_thread(lambda: None)
    raise AssertionError("never came true")


def test_one_addresss_burst_of_sign_ins_still_waits_its_turn() -> None:
    """An address holds at most half of the places; the places are twice what one
    burst needs, so a client signing 33 users in at once on 2 CPUs (one check at a
    time) still waits its turn as it did before the shares, instead of 17 of them
    getting 503 `logins_busy`."""
    checks = PasswordChecks(slots=1)
    assert checks.slots + checks.waiting == 66
    assert checks.share == 33
