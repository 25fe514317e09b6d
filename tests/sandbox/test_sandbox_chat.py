"""ChatHub logic with list sinks: queueing, reminders, robot, off hours, timeouts, ratings."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.sandbox.chat import ChatError, ChatHub, Visitor
from gateway.sandbox.settings import AgentAccount, WorkingHours
from tests.support.process import wait_for
from tests.support.sandbox import settings

Events = list[dict[str, Any]]

TOM = Visitor("u1", "Tom")
ANN = Visitor("u2", "Ann")
BOB = Visitor("u3", "Bob")


def messages(events: Events) -> Events:
    """Messages as a widget sees them: a hello's history, then live message events."""
    out: Events = []
    for e in events:
        if e["type"] == "hello" and e["chat"]:
            out = [m for m in e["chat"]["messages"]]
        elif e["type"] == "message" and all(m["id"] != e["id"] for m in out):
            out.append(e)
    return out


def texts(events: Events, sender: str | None = None) -> list[str]:
    return [m["text"] for m in messages(events) if sender is None or m["from"] == sender]


def states(events: Events) -> list[str]:
    return [e["chat"]["state"] if e["type"] == "hello" else e["state"] for e in events
            if e["type"] == "state" or (e["type"] == "hello" and e["chat"])]


@pytest.fixture
async def hubs() -> AsyncIterator[list[ChatHub]]:
    made: list[ChatHub] = []
    yield made
    for hub in made:
        await hub.close()


def make(hubs: list[ChatHub], **kw: Any) -> ChatHub:
    wall_clock = kw.pop("wall_clock", None) or (
        lambda: dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.UTC))
    hub = ChatHub(settings(**kw), wall_clock=wall_clock)
    hubs.append(hub)
    return hub


def idle_agent(hub: ChatHub, agent_id: str = "agent1") -> Events:
    events: Events = []
    hub.attach_agent(agent_id, events.append)
    hub.set_agent_status(agent_id, "idle")
    return events


async def test_visitor_assigned_to_idle_agent_and_conversation(hubs: list[ChatHub]) -> None:
    hub = make(hubs)
    agent = idle_agent(hub)
    visitor: Events = []
    session = hub.attach_visitor(TOM, visitor.append)
    assert session.state == "active" and session.agent_id == "agent1"
    assert visitor[0]["type"] == "hello" and visitor[0]["visitor"]["name"] == "Tom"
    assert next(e for e in agent if e["type"] == "chat")["chat"]["visitor"]["name"] == "Tom"
    hub.visitor_message(TOM, "  hello  ")
    hub.agent_message("agent1", session.id, "hi Tom")
    assert texts(agent, "visitor") == ["hello"]
    assert texts(visitor, "agent") == ["hi Tom"]
    assert "Agent One is now serving you." in texts(visitor, "system")


async def test_agent_in_rest_gets_nothing_until_idle(hubs: list[ChatHub]) -> None:
    hub = make(hubs, queue_reminder_interval=10)
    agent: Events = []
    hub.attach_agent("agent1", agent.append)
    assert hub.agent("agent1").status == "rest"
    visitor: Events = []
    session = hub.attach_visitor(TOM, visitor.append)
    assert session.state == "queued"
    assert [e["length"] for e in agent if e["type"] == "queue"] == [1]
    hub.set_agent_status("agent1", "idle")
    assert str(session.state) == "active"
    assert states(visitor) == ["queued", "active"]
    assert [e["length"] for e in agent if e["type"] == "queue"] == [1, 0]


async def test_queue_reminder_repeats_while_no_agent_is_idle(hubs: list[ChatHub]) -> None:
    hub = make(hubs, queue_reminder_interval=0.05,
               queue_no_agent_text="wait please, you are #{position}")
    visitor: Events = []
    hub.attach_visitor(TOM, visitor.append)
    await wait_for(lambda: len(texts(visitor, "system")) >= 3)
    assert texts(visitor, "system")[:3] == ["wait please, you are #1"] * 3
    session = hub.current_session(TOM)
    assert session is not None and session.task is not None
    queue_timer = session.task
    idle_agent(hub)

    def reminders() -> int:
        return len([t for t in texts(visitor, "system") if t.startswith("wait please")])

    count = reminders()
    # The agent joined: the queue timer, the only thing that posts reminders, has ended.
    await wait_for(queue_timer.done)
    assert reminders() == count
    assert session.state == "active"


async def test_visitors_are_told_busy_only_while_an_agent_is_ready_but_full(
        hubs: list[ChatHub]) -> None:
    """What the console shows (rest, or idle and full) is what a waiting visitor reads."""
    agents = [AgentAccount(id="agent1", name="Agent One", password=SecretStr("agent1"),
                           max_chats=1)]
    hub = make(hubs, queue_reminder_interval=0.05, agents=agents,
               queue_reminder_text="busy #{position}", queue_no_agent_text="nobody #{position}")
    console: Events = []
    hub.attach_agent("agent1", console.append)  # signed in, resting
    visitor: Events = []
    hub.attach_visitor(TOM, visitor.append)
    await wait_for(lambda: "nobody #1" in texts(visitor, "system"))
    assert "busy #1" not in texts(visitor, "system")
    hub.set_agent_status("agent1", "idle")  # takes Tom: now idle and full
    assert hub.current_session(TOM).state == "active"  # type: ignore[union-attr]
    other: Events = []
    hub.attach_visitor(ANN, other.append)
    await wait_for(lambda: "busy #1" in texts(other, "system"))
    assert "nobody #1" not in texts(other, "system")
    assert next(e for e in console if e["type"] == "welcome")["maxChats"] == 1


async def test_a_visitor_who_left_frees_the_queue_and_the_agents_slot(
        hubs: list[ChatHub]) -> None:
    agents = [AgentAccount(id="agent1", name="Agent One", password=SecretStr("agent1"),
                           max_chats=1)]
    hub = make(hubs, agents=agents, visitor_gone_timeout=0.1)
    console = idle_agent(hub)
    tom: Events = []
    hub.attach_visitor(TOM, tom.append)
    tom_chat = hub.current_session(TOM)
    assert tom_chat is not None and tom_chat.state == "active"
    ann: Events = []
    hub.attach_visitor(ANN, ann.append)
    bob: Events = []
    hub.attach_visitor(BOB, bob.append)
    assert hub.queue_length == 2
    # Bob's page closes while he waits: he leaves the queue, Ann moves up.
    hub.detach_visitor(BOB, bob.append)
    await wait_for(lambda: hub.queue_length == 1)
    assert hub.current_session(BOB).end_reason == "visitor_left"  # type: ignore[union-attr]
    # Tom's page reloads (closes, comes back within the time): his chat goes on.
    hub.detach_visitor(TOM, tom.append)
    assert hub.awaiting_return(TOM)
    hub.attach_visitor(TOM, tom.append)
    assert not hub.awaiting_return(TOM)  # the countdown is off
    assert tom_chat.state == "active" and hub.queue_length == 1
    # Tom's page closes for good: his chat ends and the slot goes to Ann.
    hub.detach_visitor(TOM, tom.append)
    await wait_for(lambda: tom_chat.state == "ended")
    assert tom_chat.end_reason == "visitor_left"
    assert any(e["type"] == "ended" and e["chat"] == tom_chat.id and e["reason"] ==
               "visitor_left" for e in console)
    assert hub.current_session(ANN).state == "active"  # type: ignore[union-attr]
    assert hub.queue_length == 0


async def test_max_queue_refuses_with_message(hubs: list[ChatHub]) -> None:
    hub = make(hubs, max_queue=2, queue_full_message="queue is full")
    sinks: dict[str, Events] = {}
    for v in (TOM, ANN, BOB):
        sinks[v.user_id] = []
        hub.attach_visitor(v, sinks[v.user_id].append)
    assert hub.queue_length == 2
    assert hub.current_session(BOB).state == "ended"  # type: ignore[union-attr]
    assert hub.current_session(BOB).end_reason == "queue_full"  # type: ignore[union-attr]
    assert "queue is full" in texts(sinks["u3"], "system")
    assert hub.queue_position(hub.current_session(ANN)) == 2  # type: ignore[arg-type]


async def test_queue_order_is_first_come_first_served(hubs: list[ChatHub]) -> None:
    hub = make(hubs, agents=[AgentAccount(id="a", name="A", password=SecretStr("p"),
                                          max_chats=1)])
    for v in (TOM, ANN):
        hub.attach_visitor(v, lambda e: None)
    idle_agent(hub, "a")
    assert hub.current_session(TOM).agent_id == "a"  # type: ignore[union-attr]
    assert hub.current_session(ANN).state == "queued"  # type: ignore[union-attr]
    hub.visitor_end(TOM)
    assert hub.current_session(ANN).agent_id == "a"  # type: ignore[union-attr]


async def test_queue_wait_timeout_releases(hubs: list[ChatHub]) -> None:
    hub = make(hubs, max_wait=1, queue_reminder_interval=10,
               queue_timeout_message="nobody came")
    visitor: Events = []
    hub.attach_visitor(TOM, visitor.append)
    # max_wait has a floor of 1 s (the CEC's range): start the wait 0.95 s in the past
    # (the timer task reads queued_at when it first runs, after this line).
    hub.current_session(TOM).queued_at -= 0.95  # type: ignore[union-attr]
    await wait_for(lambda: "ended" in states(visitor))
    assert "nobody came" in texts(visitor, "system")
    assert hub.queue_length == 0


async def test_off_hours_message(hubs: list[ChatHub]) -> None:
    hours = WorkingHours(timezone="+08:00", workday_periods=[{"start": "09:00", "end": "18:00"}],
                         other_day_periods=[])
    # Tuesday 2026-11-24 20:00 at +08:00 is 12:00 UTC: after working hours.
    hub = make(hubs, working_hours=hours, off_hours_message="we are closed",
               wall_clock=lambda: dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC))
    idle_agent(hub)
    visitor: Events = []
    session = hub.attach_visitor(TOM, visitor.append)
    assert session.state == "ended" and session.end_reason == "off_hours"
    assert texts(visitor, "system") == ["we are closed"]


async def test_inside_working_hours_is_served(hubs: list[ChatHub]) -> None:
    hours = WorkingHours(timezone="+08:00", workday_periods=[{"start": "09:00", "end": "18:00"}])
    hub = make(hubs, working_hours=hours,
               wall_clock=lambda: dt.datetime(2026, 11, 24, 2, 0, tzinfo=dt.UTC))  # 10:00 +8
    idle_agent(hub)
    assert hub.attach_visitor(TOM, lambda e: None).state == "active"


def test_working_hours_periods() -> None:
    hours = WorkingHours(workdays=[1, 2, 3, 4, 5],
                         workday_periods=[{"start": "09:00", "end": "12:00"},
                                          {"start": "13:00", "end": "18:00"}],
                         other_day_periods=[{"start": "10:00", "end": "14:00"}])
    tue = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)
    sat = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    assert hours.is_open(tue.replace(hour=9))
    assert not hours.is_open(tue.replace(hour=12, minute=30))
    assert not hours.is_open(tue.replace(hour=18))
    assert hours.is_open(sat.replace(hour=13))
    assert not hours.is_open(sat.replace(hour=9))


async def test_robot_first_then_handover_keyword(hubs: list[ChatHub]) -> None:
    hub = make(hubs, robot={"enabled": True, "name": "Bot", "greeting": "hi, I am Bot",
                            "default_reply": "pardon?", "handover_message": "transferring"})
    agent = idle_agent(hub)
    visitor: Events = []
    session = hub.attach_visitor(TOM, visitor.append)
    assert session.state == "robot" and session.agent_id is None
    hub.visitor_message(TOM, "what are your prices")
    assert texts(visitor, "robot") == ["hi, I am Bot", "pardon?"]
    assert not [e for e in agent if e["type"] == "chat"]
    hub.visitor_message(TOM, "请帮我转人工")
    assert str(session.state) == "active" and session.agent_id == "agent1"
    assert texts(visitor, "robot")[-1] == "transferring"
    assigned = next(e for e in agent if e["type"] == "chat")["chat"]
    # The agent sees the robot part of the conversation too.
    assert [m["text"] for m in assigned["messages"]][:3] == [
        "hi, I am Bot", "what are your prices", "pardon?"]
    hub.visitor_message(TOM, "转人工")  # with a human, the keyword is just text
    assert texts(visitor, "robot")[-1] == "transferring" and str(session.state) == "active"


async def test_robot_handover_with_no_agent_queues(hubs: list[ChatHub]) -> None:
    hub = make(hubs, robot={"enabled": True})
    visitor: Events = []
    session = hub.attach_visitor(TOM, visitor.append)
    hub.visitor_message(TOM, "转人工")
    assert session.state == "queued" and hub.queue_length == 1


async def test_idle_session_ends(hubs: list[ChatHub]) -> None:
    hub = make(hubs, session_timeout=0.1, session_end_message="bye for now")
    agent = idle_agent(hub)
    visitor: Events = []
    session = hub.attach_visitor(TOM, visitor.append)
    await asyncio.sleep(0.06)
    hub.visitor_message(TOM, "still here")  # activity pushes the deadline out
    await asyncio.sleep(0.06)
    assert session.state == "active"
    await wait_for(lambda: session.state == "ended", within=1.0)
    assert session.end_reason == "timeout"
    assert "bye for now" in texts(visitor, "system")
    assert {"type": "ended", "chat": session.id, "reason": "timeout"} in agent
    assert hub.agent("agent1").chats == {}


async def test_rating_last_wins_and_reaches_agent(hubs: list[ChatHub]) -> None:
    hub = make(hubs)
    agent = idle_agent(hub)
    visitor: Events = []
    session = hub.attach_visitor(TOM, visitor.append)
    hub.visitor_rate(TOM, 2, "slow")
    hub.visitor_end(TOM)
    hub.visitor_rate(TOM, 5, " great ")  # rating after the end is allowed
    assert session.rating is not None and session.rating.stars == 5
    assert session.rating.comment == "great"
    ratings = [(e["stars"], e["comment"]) for e in agent if e["type"] == "rating"]
    assert ratings == [(2, "slow"), (5, "great")]


@pytest.mark.parametrize("stars", [0, 6, "5", True, None, 2.5])
async def test_rating_validation(hubs: list[ChatHub], stars: object) -> None:
    hub = make(hubs)
    idle_agent(hub)
    hub.attach_visitor(TOM, lambda e: None)
    with pytest.raises(ChatError):
        hub.visitor_rate(TOM, stars, "")


async def test_rating_needs_an_agent(hubs: list[ChatHub]) -> None:
    hub = make(hubs)
    hub.attach_visitor(TOM, lambda e: None)  # queued, nobody served yet
    with pytest.raises(ChatError):
        hub.visitor_rate(TOM, 4, "")


async def test_reconnect_resumes_chat_and_message_after_end_starts_new(
        hubs: list[ChatHub]) -> None:
    hub = make(hubs)
    idle_agent(hub)
    first: Events = []
    session = hub.attach_visitor(TOM, first.append)
    hub.visitor_message(TOM, "one")
    hub.detach_visitor(TOM, first.append)
    second: Events = []
    assert hub.attach_visitor(TOM, second.append) is session
    assert [m["text"] for m in second[0]["chat"]["messages"]][-1] == "one"
    hub.agent_end("agent1", session.id)
    assert session.state == "ended" and "ended" in states(second)
    hub.visitor_message(TOM, "two")
    new = hub.current_session(TOM)
    assert new is not None and new is not session and new.state == "active"
    assert new.messages[0].text == "two"


async def test_agent_cannot_touch_other_chats(hubs: list[ChatHub]) -> None:
    hub = make(hubs, agents=[
        AgentAccount(id="a", name="A", password=SecretStr("p")),
        AgentAccount(id="b", name="B", password=SecretStr("q"))])
    idle_agent(hub, "a")
    session = hub.attach_visitor(TOM, lambda e: None)
    hub.attach_agent("b", lambda e: None)
    with pytest.raises(ChatError):
        hub.agent_message("b", session.id, "hijack")
    with pytest.raises(ChatError):
        hub.agent_end("b", session.id)


async def test_agent_capacity_and_least_busy_choice(hubs: list[ChatHub]) -> None:
    hub = make(hubs, agents=[
        AgentAccount(id="a", name="A", password=SecretStr("p"), max_chats=1),
        AgentAccount(id="b", name="B", password=SecretStr("q"), max_chats=1)])
    idle_agent(hub, "a")
    idle_agent(hub, "b")
    got = {hub.attach_visitor(v, lambda e: None).agent_id for v in (TOM, ANN)}
    assert got == {"a", "b"}
    assert hub.attach_visitor(BOB, lambda e: None).state == "queued"


def test_authenticate_agent() -> None:
    hub = ChatHub(settings())
    assert hub.authenticate_agent("agent1", "agent1") is not None
    assert hub.authenticate_agent("agent1", "wrong") is None
    assert hub.authenticate_agent("nobody", "agent1") is None
    assert hub.authenticate_agent(None, None) is None


def test_visitor_tokens_expire() -> None:
    now = [0.0]
    hub = ChatHub(settings(visitor_ttl=10), clock=lambda: now[0])
    token = hub.register_visitor(TOM)
    assert hub.lookup_visitor(token) == TOM
    assert hub.lookup_visitor("other") is None
    now[0] = 11.0
    assert hub.lookup_visitor(token) is None


async def test_message_validation(hubs: list[ChatHub]) -> None:
    hub = make(hubs, max_message_length=5)
    idle_agent(hub)
    hub.attach_visitor(TOM, lambda e: None)
    for bad in ("", "   ", None, 5, "toolong"):
        with pytest.raises(ChatError):
            hub.visitor_message(TOM, bad)
