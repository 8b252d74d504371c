"""Delivering a company's own webhook (`company_webhooks.deliver_due`), attacked: a
name that answers a public address to the check and an inward one next (DNS
rebinding) still gets its post at the address checked; a URL no delivery can use,
or any failure of one delivery, is a failed attempt, so the event backs off and is
given up after `GIVE_UP_AFTER` instead of coming back every lease for ever.

Each test has its own SQLite outbox (no background deliverer: the test runs the
passes) and its own answers for one DNS name."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from cryptography import x509
from cryptography.fernet import Fernet, MultiFernet

from control_plane import company_webhooks
from control_plane.company_webhooks import BACKOFF, GIVE_UP_AFTER, claim_due, deliver_due
from control_plane.credentials import verify_password
from control_plane.db import Database
from control_plane.host_lookups import HostLookups
from control_plane.migrate import upgrade
from control_plane.password_checks import PasswordChecks
from control_plane.tables import BudgetEvent, Company, CompanyWebhook, new_id, utcnow
from shared.webhooks import generate_secret, verify
from tests import tls_certs
from tests.harness import bind_free_socket

NAME = "hooks.example.com"
PUBLIC = "93.184.216.34"  # a globally routable address
CHEAP_HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash


@dataclass
class Outbox:
    """One company, its webhook secret, and one due `budget.threshold` event."""

    db: Database
    fernet: MultiFernet
    secret: str
    company_id: str
    event_id: str

    def set_url(self, url: str) -> None:
        """Store the URL as it is: rows written before today's checks look like this."""

        def write(session: Any) -> None:
            session.get(CompanyWebhook, self.company_id).url = url

        asyncio.run(self.db.transaction(write))

    def deliver(self, client: httpx.AsyncClient, *, allow_private: bool = False) -> int:
        async def run() -> int:
            async with client:
                return await deliver_due(self.db, self.fernet, client, allow_private=allow_private)

        return asyncio.run(run())

    def event(self) -> BudgetEvent:
        event = asyncio.run(self.db.transaction(lambda s: s.get(BudgetEvent, self.event_id)))
        assert event is not None
        return event

    def make_due(self, age: datetime.timedelta) -> None:
        """Due now, created `age` ago."""

        def write(session: Any) -> None:
            event = session.get(BudgetEvent, self.event_id)
            event.created_at, event.next_attempt_at = utcnow() - age, utcnow()

        asyncio.run(self.db.transaction(write))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    url = f"sqlite:///{tmp_path}/cp.db"
    upgrade(url)
    db = Database(url)
    fernet, secret = MultiFernet([Fernet(Fernet.generate_key())]), generate_secret()
    company_id, event_id = new_id(), new_id()
    now = utcnow()

    def seed(session: Any) -> None:
        session.add(Company(id=company_id, name="c", balance_micro=0, held_micro=0, created_at=now))
        session.flush()
        session.add(
            CompanyWebhook(
                company_id=company_id,
                url=f"https://{NAME}/budget",
                secret_encrypted=fernet.encrypt(secret.encode()).decode(),
                created_at=now,
                updated_at=now,
            )
        )
        session.add(
            BudgetEvent(
                id=event_id,
                company_id=company_id,
                budget_id="b",
                period_start=now,
                percent=80,
                payload={"type": "budget.threshold", "id": event_id},
                attempts=0,
                created_at=now,
                next_attempt_at=now - datetime.timedelta(seconds=1),
            )
        )

    asyncio.run(db.transaction(seed))
    try:
        yield Outbox(db, fernet, secret, company_id, event_id)
    finally:
        db.close()


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What `NAME` resolves to, one answer per lookup (then no answer); every other
    name and address resolves as usual. Our check resolves through the system's
    `getaddrinfo` on threads of its own (`host_lookups`); the post then connects to
    the address it got, with no lookup of its own."""
    answers: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if (host.decode() if isinstance(host, bytes) else host) != NAME:
            return real(host, port, *args, **kw)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "no more answers")
        address = answers.pop(0)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


async def _answer_204(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A receiver that takes each post at once."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


def _other_company(outbox: Outbox, url: str) -> str:
    """Another company, its webhook at `url`; its id."""
    company_id, now = new_id(), utcnow()

    def seed(session: Any) -> None:
        session.add(Company(id=company_id, name="o", balance_micro=0, held_micro=0, created_at=now))
        session.flush()
        session.add(
            CompanyWebhook(
                company_id=company_id, url=url,
                secret_encrypted=outbox.fernet.encrypt(generate_secret().encode()).decode(),
                created_at=now, updated_at=now,
            )
        )  # fmt: skip

    asyncio.run(outbox.db.transaction(seed))
    return company_id


def _event(
    event_id: str, company_id: str, due: datetime.datetime, budget_id: str = "theirs"
) -> BudgetEvent:
    """A company's `budget.threshold` event (80 % of `budget_id`), due at `due`."""
    return BudgetEvent(
        id=event_id, company_id=company_id, budget_id=budget_id, period_start=due,
        percent=80, payload={"type": "budget.threshold"}, attempts=0,
        created_at=due, next_attempt_at=due,
    )  # fmt: skip


def _recording(seen: list[httpx.Request], status: int = 204) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status)

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def test_a_delivery_connects_to_the_address_it_checked(outbox: Outbox, dns: list[str]) -> None:
    dns += [PUBLIC, "127.0.0.1"]  # public to the first lookup, inward to any later one
    seen: list[httpx.Request] = []
    assert outbox.deliver(_recording(seen)) == 1
    (request,) = seen
    assert (request.url.scheme, request.url.host, request.url.path) == ("https", PUBLIC, "/budget")
    assert request.headers["host"] == NAME
    assert request.extensions["sni_hostname"] == NAME  # TLS: SNI and certificate check
    assert request.headers["connection"] == "close"  # a pooled connection is by address
    verify([outbox.secret], request.content, dict(request.headers))
    assert dns == ["127.0.0.1"]  # nobody looked the name up a second time
    assert outbox.event().delivered_at is not None


def test_a_name_resolving_inward_is_a_failed_attempt(outbox: Outbox, dns: list[str]) -> None:
    dns += ["10.0.0.7"]
    seen: list[httpx.Request] = []
    assert outbox.deliver(_recording(seen)) == 0
    assert seen == []
    assert outbox.event().attempts == 1


@pytest.mark.parametrize("url", ["http://example.com:99999/hook", "http://[::1/hook"])
def test_a_stored_url_no_delivery_can_use_is_a_failed_attempt(outbox: Outbox, url: str) -> None:
    """It used to raise out of the pass before the attempt was recorded: `attempts`
    stayed 0 and the event came back every lease, for ever."""
    outbox.set_url(url)
    seen: list[httpx.Request] = []
    before = utcnow()
    assert outbox.deliver(_recording(seen)) == 0
    event = outbox.event()
    assert (event.attempts, event.delivered_at, seen) == (1, None, [])
    # Backing off, never straight back: full jitter alone once drew a few
    # milliseconds, and the event was due again before this line read it.
    assert event.next_attempt_at >= before + datetime.timedelta(seconds=BACKOFF.floor)
    # The last attempt allowed fails too; then the event is never claimed again.
    outbox.make_due(GIVE_UP_AFTER - datetime.timedelta(minutes=1))
    outbox.deliver(_recording(seen))
    assert outbox.event().attempts == 2
    outbox.make_due(GIVE_UP_AFTER + datetime.timedelta(seconds=1))
    claimed = asyncio.run(outbox.db.transaction(lambda s: claim_due(s, outbox.fernet, utcnow(), 9)))
    assert claimed == []


def test_any_exception_in_one_delivery_is_a_failed_attempt(outbox: Outbox) -> None:
    outbox.set_url("http://127.0.0.1:9/hook")

    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("not an httpx error")

    client = httpx.AsyncClient(transport=httpx.MockTransport(explode))
    assert outbox.deliver(client, allow_private=True) == 0
    assert outbox.event().attempts == 1


# --- a real TLS receiver: the pinned post keeps the name for SNI and the certificate ---


def _certificate_for(name: str, tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only it): valid for `name`, not for
    any address, so connecting by address with the name lost would fail the check."""
    return tls_certs.self_signed(tmp, name, [x509.DNSName(name)])


def test_a_pinned_delivery_over_tls_keeps_the_name(
    outbox: Outbox, dns: list[str], tmp_path: Path
) -> None:
    server_context, client_context = _certificate_for(NAME, tmp_path)
    names: list[str | None] = []

    def record_sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    server_context.sni_callback = record_sni
    heads: list[bytes] = []

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        heads.append(head)
        writer.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    sock = bind_free_socket()
    outbox.set_url(f"https://{NAME}:{sock.getsockname()[1]}/budget")
    dns.append("127.0.0.1")  # one answer: a second lookup would find nothing

    async def run() -> int:
        server = await asyncio.start_server(receive, sock=sock, ssl=server_context)
        try:
            async with httpx.AsyncClient(verify=client_context) as client:
                return await deliver_due(outbox.db, outbox.fernet, client, allow_private=True)
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()) == 1
    assert names == [NAME]
    (head,) = heads
    assert f"host: {NAME}:".encode() in head.lower()
    assert outbox.event().delivered_at is not None


# --- a hostile receiver: the company's own server answers as it likes ------------------


def _deliver_to(outbox: Outbox, receive: Any) -> int:
    """One pass against `receive` on a real socket of this host (the company's URL
    points at it; private addresses allowed, as with
    LLMGW_COMPANY_WEBHOOKS_ALLOW_PRIVATE). A pass that never returns fails the test
    at a generous deadline instead of hanging the suite."""
    sock = bind_free_socket()
    outbox.set_url(f"http://127.0.0.1:{sock.getsockname()[1]}/budget")

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await receive(reader, writer)
        finally:  # also when the loop cancels a handler still at it
            writer.close()

    async def run() -> int:
        server = await asyncio.start_server(closing, sock=sock)
        try:
            async with httpx.AsyncClient(timeout=company_webhooks.TIMEOUT) as client:
                return await asyncio.wait_for(
                    deliver_due(outbox.db, outbox.fernet, client, allow_private=True), 60
                )
        finally:
            server.close()

    return asyncio.run(run())


def test_a_receivers_endless_answer_is_never_read_into_memory(outbox: Outbox) -> None:
    """It was read whole (`client.send` without `stream`): a company's server
    answering 200 with an endless chunked body pushed ~850 MB into the control plane
    in 5 s, on its way to exhausting its memory, and held the pass meanwhile."""
    pushed = 0
    limit = 256 * 1024 * 1024  # where the receiver gives up (the unfixed reader got it all)
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while pushed < limit:
                writer.write(chunk)
                await writer.drain()
                pushed += len(chunk)
        except ConnectionError:
            return  # the control plane hung up: what we want
        await asyncio.Event().wait()  # never ends the body

    assert _deliver_to(outbox, receive) == 1  # a 2xx is a delivery, whatever follows
    assert outbox.event().delivered_at is not None
    # What the sockets' kernel buffers absorb before the hang-up, no more.
    assert pushed < 32 * 1024 * 1024


def test_a_receiver_dribbling_its_answer_cannot_hold_the_delivery_pass(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx's timeouts are per read: a head sent a byte every 0.2 s never tripped
    them, and the pass (which waits for every post) never ended, so no company's
    event was delivered again. One attempt now has `ATTEMPT_SECONDS` in all."""
    monkeypatch.setattr(company_webhooks, "ATTEMPT_SECONDS", 1.0)

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            for byte in iter(lambda: b"H", None):
                writer.write(byte)
                await writer.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            return

    before = utcnow()
    assert _deliver_to(outbox, receive) == 0
    event = outbox.event()
    assert (event.attempts, event.delivered_at) == (1, None)  # a failed attempt, backing off
    assert event.next_attempt_at >= before + datetime.timedelta(seconds=BACKOFF.floor)


def test_one_companys_stalling_receiver_cannot_hold_back_another_companys_events(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass claimed the 50 events due first, whoever they were for, and waited for
    every post. An owner whose budgets crossed their thresholds by the thousand (up
    to 10,000 budgets, 48 on one request: 96 events a cheap stream) and whose server
    holds each post to the end of its attempt (30 s) filled every pass with its own:
    another company's event due a moment later waited for all of them (20,000 events
    at 10 posts in flight: hours). Each pass now takes a few events of each company
    (`PER_COMPANY`), the longest waiting first."""
    monkeypatch.setattr(company_webhooks, "ATTEMPT_SECONDS", 1.0)
    first = utcnow() - datetime.timedelta(minutes=5)

    def flood(session: Any) -> None:
        for i in range(company_webhooks.BATCH + 10):
            session.add(
                BudgetEvent(
                    id=new_id(), company_id=outbox.company_id, budget_id=f"b{i}",
                    period_start=first, percent=80, payload={"type": "budget.threshold"},
                    attempts=0, created_at=first, next_attempt_at=first,
                )
            )  # fmt: skip

    asyncio.run(outbox.db.transaction(flood))
    stalling, prompt = bind_free_socket(), bind_free_socket()
    outbox.set_url(f"http://127.0.0.1:{stalling.getsockname()[1]}/budget")
    other = _other_company(outbox, f"http://127.0.0.1:{prompt.getsockname()[1]}/budget")
    other_event = new_id()
    asyncio.run(outbox.db.transaction(lambda s: s.add(_event(other_event, other, utcnow()))))
    held = 0

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal held
        held += 1
        try:
            await reader.read()  # never answers
        finally:
            writer.close()

    async def run() -> int:
        servers = [
            await asyncio.start_server(hold, sock=stalling),
            await asyncio.start_server(_answer_204, sock=prompt),
        ]
        try:
            async with httpx.AsyncClient(timeout=company_webhooks.TIMEOUT) as client:
                return await asyncio.wait_for(
                    deliver_due(outbox.db, outbox.fernet, client, allow_private=True), 60
                )
        finally:
            for server in servers:
                server.close()

    assert asyncio.run(run()) == 1  # the other company's event, in the first pass
    delivered = asyncio.run(outbox.db.transaction(lambda s: s.get(BudgetEvent, other_event)))
    assert delivered is not None and delivered.delivered_at is not None
    assert held <= company_webhooks.PER_COMPANY  # the stalling company's share, no more


# --- IPv6 addresses that carry an inward IPv4 one -----------------------------------------

# `ipaddress` calls each of these "global" (it judges the IPv6 prefix); a NAT64
# translator on the path (IPv6-only cloud subnets) or the host itself connects to
# the IPv4 address inside: loopback, the cloud metadata service, the private network.
WRAPPED_INWARD = [
    "64:ff9b::7f00:1",  # NAT64 (RFC 6052) of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::a00:7",  # NAT64 of 10.0.0.7
    "64:ff9b:1::5db8:d822",  # the operator's own NAT64 prefix (RFC 8215)
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "fec0::1",  # site-local
]
PUBLIC_V4_IN_V6 = "5db8:d822"  # 93.184.216.34, PUBLIC


def test_an_owner_cannot_aim_its_webhook_inward_through_an_ipv6_wrapper(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from tests.test_control_plane import start_cp

    with start_cp(request, tmp_path, "sqlite") as cp:
        company = cp.company("1")
        owner = cp.client(cp.api_key(cp.user(company, "owner", password=None)["id"]))
        hook = f"/v1/admin/companies/{company}/webhook"
        for address in WRAPPED_INWARD:
            answer = owner.put(hook, json={"url": f"http://[{address}]/hook"})
            assert answer.status_code == 422, (address, answer.text)
        assert owner.get(hook).status_code == 404  # nothing was stored
        # A public address behind NAT64 (an IPv6-only host's DNS64 answer) still works.
        assert owner.put(hook, json={"url": f"http://[64:ff9b::{PUBLIC_V4_IN_V6}]/h"}).is_success


@pytest.mark.parametrize("address", WRAPPED_INWARD)
def test_a_name_resolving_to_a_wrapped_inward_address_is_not_posted_to(
    outbox: Outbox, dns: list[str], address: str
) -> None:
    dns.append(address)
    seen: list[httpx.Request] = []
    assert outbox.deliver(_recording(seen)) == 0
    assert seen == []
    assert outbox.event().attempts == 1


# --- several control-plane processes share the outbox -------------------------------------


def test_a_pass_working_through_its_claims_never_sees_another_process_post_them(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every control-plane process (`--workers N`, replicas) runs a deliverer. A pass
    claims up to `BATCH` events and posts them `PARALLEL` at a time, each attempt up
    to `ATTEMPT_SECONDS`: its last claims are posted up to five attempts (150 s)
    after the claim, but the lease was 60 s. Receivers that hang (ten of a pass's
    companies) left the rest of the pass queued past its lease, and another process
    claimed those events and posted them as well (measured: all 50 events of the
    pass posted by both). A lease now outlasts a pass; an event whose process died
    still comes back to another one once it has run out."""
    start = utcnow()
    clock = [start]
    monkeypatch.setattr(company_webhooks, "utcnow", lambda: clock[0])
    outbox.set_url("http://127.0.0.1:9/budget")

    def seed(session: Any) -> None:
        for i in range(company_webhooks.BATCH - 1):
            company = new_id()
            session.add(Company(id=company, name=f"c{i}", balance_micro=0, held_micro=0,
                                created_at=start))  # fmt: skip
            session.flush()
            session.add(
                CompanyWebhook(
                    company_id=company, url=f"http://127.0.0.1:9/c{i}",
                    secret_encrypted=outbox.fernet.encrypt(generate_secret().encode()).decode(),
                    created_at=start, updated_at=start,
                )
            )  # fmt: skip
            session.add(
                BudgetEvent(
                    id=new_id(), company_id=company, budget_id=f"b{i}", period_start=start,
                    percent=80, payload={"type": "budget.threshold"}, attempts=0,
                    created_at=start, next_attempt_at=start - datetime.timedelta(seconds=1),
                )
            )  # fmt: skip

    asyncio.run(outbox.db.transaction(seed))
    posted_by_a: list[str] = []
    posted_by_b: list[str] = []

    async def run() -> None:
        in_flight, release = asyncio.Event(), asyncio.Event()

        async def hanging(request: httpx.Request) -> httpx.Response:
            posted_by_a.append(request.headers["webhook-id"])
            if len(posted_by_a) == company_webhooks.PARALLEL:
                in_flight.set()
            await release.wait()  # the receivers hang until the test lets them answer
            return httpx.Response(204)

        def prompt(request: httpx.Request) -> httpx.Response:
            posted_by_b.append(request.headers["webhook-id"])
            return httpx.Response(204)

        a = httpx.AsyncClient(transport=httpx.MockTransport(hanging))
        b = httpx.AsyncClient(transport=httpx.MockTransport(prompt))
        async with a, b:
            pass_a = asyncio.create_task(
                deliver_due(outbox.db, outbox.fernet, a, allow_private=True)
            )
            await asyncio.wait_for(in_flight.wait(), 30)
            # Process B's pass while A still works through what it claimed: at the
            # end of the time its five waves of attempts may take.
            waves = -(-company_webhooks.BATCH // company_webhooks.PARALLEL)
            clock[0] = start + datetime.timedelta(seconds=waves * company_webhooks.ATTEMPT_SECONDS)
            await deliver_due(outbox.db, outbox.fernet, b, allow_private=True)
            assert posted_by_b == [], f"{len(posted_by_b)} of A's claims posted by B too"
            # Had A died, its claims come back to B once the lease has run out.
            clock[0] = start + datetime.timedelta(seconds=company_webhooks.LEASE_SECONDS + 1)
            await deliver_due(outbox.db, outbox.fernet, b, allow_private=True)
            assert len(set(posted_by_b)) == company_webhooks.BATCH
            release.set()
            await asyncio.wait_for(pass_a, 30)

    asyncio.run(run())


def test_a_post_that_could_outlive_its_claim_is_left_for_the_next_claim(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass whose records stalled (a slow database) reaches a claim late: posting it
    then could overlap another process's claim of it, so it is not posted, nor
    counted as an attempt; the event is due again when its lease ends."""
    outbox.set_url("http://127.0.0.1:9/hook")
    monkeypatch.setattr(company_webhooks, "START_BEFORE", -1.0)  # every claim is late
    seen: list[httpx.Request] = []
    before = utcnow()
    assert outbox.deliver(_recording(seen), allow_private=True) == 0
    event = outbox.event()
    assert (seen, event.attempts, event.delivered_at) == ([], 0, None)
    lease = datetime.timedelta(seconds=company_webhooks.LEASE_SECONDS)
    assert before + lease <= event.next_attempt_at <= utcnow() + lease


# --- a name whose lookups hang ------------------------------------------------------------


def test_a_name_whose_lookups_hang_holds_one_thread_and_stalls_nobody_else(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner points its webhook at a name whose DNS never answers (its own name
    server, told to stay silent). `asyncio.timeout` ended each attempt but not its
    `getaddrinfo`, which blocks its thread until the resolver gives up; every pass
    left two more hanging on the process's shared resolver threads (on the plain
    asyncio loop the default executor, where password checks run too; on uvloop
    libuv's four, which every other name waits for). Four passes later, another
    company's delivery and a login's password check waited behind them. Now lookups
    run on threads of their own, and a name being looked up is not looked up again."""
    monkeypatch.setattr(company_webhooks, "ATTEMPT_SECONDS", 0.3)
    released = threading.Event()
    hanging: list[str] = []
    real = socket.getaddrinfo
    other_name = "other.example.com"

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == NAME:
            hanging.append(host)
            released.wait()
            raise socket.gaierror(socket.EAI_AGAIN, "the name server never answered")
        if host == other_name:
            return real("127.0.0.1", port, *args, **kw)
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    receiver = bind_free_socket()
    other = _other_company(outbox, f"http://{other_name}:{receiver.getsockname()[1]}/budget")
    other_event = new_id()
    first = utcnow() - datetime.timedelta(minutes=5)

    def seed(session: Any) -> None:
        for i in range(10):  # the owner's events: thresholds crossed on ten budgets
            session.add(_event(new_id(), outbox.company_id, first, f"b{i}"))

    def all_due(session: Any) -> None:
        for event in session.query(BudgetEvent).filter(BudgetEvent.delivered_at.is_(None)):
            event.next_attempt_at = first

    def the_others(session: Any) -> None:
        session.add(_event(other_event, other, first - datetime.timedelta(minutes=1)))

    async def run() -> tuple[int, bool]:
        server = await asyncio.start_server(_answer_204, sock=receiver)
        lookups = HostLookups()
        try:
            await outbox.db.transaction(seed)
            async with httpx.AsyncClient(timeout=company_webhooks.TIMEOUT) as client:
                for _ in range(4):  # four passes, each ending its attempts at 0.3 s
                    await outbox.db.transaction(all_due)
                    await asyncio.wait_for(
                        deliver_due(
                            outbox.db, outbox.fernet, client, lookups=lookups, allow_private=True
                        ),
                        20,
                    )
                await outbox.db.transaction(the_others)
                delivered = await asyncio.wait_for(
                    deliver_due(
                        outbox.db, outbox.fernet, client, lookups=lookups, allow_private=True
                    ),
                    20,
                )
            # A login's password check, while the owner's name still hangs.
            checked = await asyncio.wait_for(
                PasswordChecks().run(verify_password, CHEAP_HASH("pw"), "pw"), 20
            )
            return delivered, checked
        finally:
            released.set()  # the resolver gives up at last: the threads end
            lookups.close()
            server.close()

    delivered, checked = asyncio.run(run())
    assert delivered == 1  # the other company's event, in the pass after the four
    event = asyncio.run(outbox.db.transaction(lambda s: s.get(BudgetEvent, other_event)))
    assert event is not None and event.delivered_at is not None
    assert checked is True
    assert hanging == [NAME]  # one lookup of the hanging name, shared by every attempt


def test_a_receiver_that_hangs_holds_up_no_other_companys_events_in_later_passes(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner's receiver accepts each post and never answers (up to the attempt's
    30 s). The delivery loop awaited each pass whole before the next, so another
    company's event that fell due meanwhile waited for the hanging posts to time out
    (every pass, for as long as the owner's events kept coming due). Now passes run
    side by side (a few at once), and a company with posts in flight is left out of
    the next ones: the other company's event goes out at the next tick."""
    stalling, prompt = bind_free_socket(), bind_free_socket()
    outbox.set_url(f"http://127.0.0.1:{stalling.getsockname()[1]}/budget")
    other = _other_company(outbox, f"http://127.0.0.1:{prompt.getsockname()[1]}/budget")
    other_event = new_id()

    def the_others_due(session: Any) -> None:
        session.add(_event(other_event, other, utcnow()))

    def delivered(session: Any) -> bool:
        event = session.get(BudgetEvent, other_event)
        return event is not None and event.delivered_at is not None

    held = given_up = 0

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal held, given_up
        held += 1
        try:
            await reader.read()  # never answers: until the poster gives up
            given_up += 1
        finally:
            writer.close()

    async def run() -> bool:
        servers = [
            await asyncio.start_server(hold, sock=stalling),
            await asyncio.start_server(_answer_204, sock=prompt),
        ]
        loop = asyncio.create_task(
            company_webhooks.run_deliveries(outbox.db, outbox.fernet, 0.05, allow_private=True)
        )
        try:
            while held == 0:  # the owner's event is posted, and hangs
                await asyncio.sleep(0.01)
            await outbox.db.transaction(the_others_due)
            async with asyncio.timeout(40):  # a guard only, past the hanging post's bound
                while not await outbox.db.transaction(delivered):
                    await asyncio.sleep(0.02)
            # Delivered while the owner's post still hung, not after it gave up.
            return held == 1 and given_up == 0
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            for server in servers:
                server.close()

    assert asyncio.run(run())
