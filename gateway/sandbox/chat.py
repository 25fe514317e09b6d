"""Chats, the skill queue and agents of the sandbox: pure asyncio, no HTTP.

A visitor (identified by the ``userId`` the CEC accepted) has at most one current chat. A
chat goes ``new`` -> ``robot`` (optional) -> ``queued`` -> ``active`` -> ``ended``; it can end
from any state (visitor or agent ends it, idle timeout, off hours, queue full, queue wait too
long).

Participants receive events through *sinks*: plain callables taking one JSON-able dict that
must not block (the HTTP layer puts the event on a per-connection queue). That keeps this
module testable with lists as sinks.

Timers are asyncio tasks per chat; ``clock`` (monotonic seconds) and ``wall_clock`` (aware
datetime, for working hours) are injectable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.errors import GatewayError
from gateway.sandbox.settings import AgentAccount, SandboxSettings

log = logging.getLogger("gateway.sandbox.chat")

Event = dict[str, Any]
Sink = Callable[[Event], None]
ChatState = Literal["new", "robot", "queued", "active", "ended"]
AgentStatus = Literal["offline", "rest", "idle"]
Sender = Literal["visitor", "agent", "robot", "system"]

MAX_COMMENT_LENGTH = 500
_MAX_VISITOR_TOKENS = 10_000
_AGENT_HISTORY = 20


class ChatError(GatewayError):
    """A participant asked for something the chat's state does not allow."""


@dataclass(frozen=True)
class Visitor:
    """Who the CEC accepted: identity from the signed or validated ``thirdUserData``."""

    user_id: str
    user_name: str
    locale: str = "zh"
    mode: Literal["authorization", "token"] = "authorization"


@dataclass(frozen=True)
class Message:
    id: int
    sender: Sender
    name: str
    text: str
    ts: int  # milliseconds since the epoch

    def to_json(self) -> Event:
        return {"id": self.id, "from": self.sender, "name": self.name, "text": self.text,
                "ts": self.ts}


@dataclass(frozen=True)
class Rating:
    stars: int
    comment: str

    def to_json(self) -> Event:
        return {"stars": self.stars, "comment": self.comment}


@dataclass(eq=False)
class ChatSession:
    id: str
    visitor: Visitor
    state: ChatState = "new"
    agent_id: str | None = None
    messages: list[Message] = field(default_factory=list)
    rating: Rating | None = None
    end_reason: str | None = None
    last_activity: float = 0.0
    queued_at: float = 0.0
    task: asyncio.Task[None] | None = None

    def to_json(self, agent_name: str | None = None) -> Event:
        return {
            "id": self.id,
            "state": self.state,
            "visitor": {"id": self.visitor.user_id, "name": self.visitor.user_name},
            "agent": {"id": self.agent_id, "name": agent_name} if self.agent_id else None,
            "messages": [m.to_json() for m in self.messages],
            "rating": self.rating.to_json() if self.rating else None,
            "endReason": self.end_reason,
        }


@dataclass(eq=False)
class _VisitorEntry:
    visitor: Visitor
    sinks: list[Sink] = field(default_factory=list)
    session: ChatSession | None = None
    gone: asyncio.Task[None] | None = None  # ends the chat unless the visitor comes back


@dataclass(eq=False)
class AgentState:
    account: AgentAccount
    status: AgentStatus = "offline"
    chats: dict[str, ChatSession] = field(default_factory=dict)
    recent: collections.deque[ChatSession] = field(
        default_factory=lambda: collections.deque(maxlen=_AGENT_HISTORY))
    sinks: list[Sink] = field(default_factory=list)
    idle_since: float = 0.0

    def has_capacity(self) -> bool:
        return self.status == "idle" and len(self.chats) < self.account.max_chats


def _send(sinks: Iterable[Sink], event: Event) -> None:
    for sink in list(sinks):
        try:
            sink(event)
        except Exception:
            # One broken connection must not stop the others from hearing about the event.
            log.exception("a sink failed")


class ChatHub:
    """All chats of one channel and its skill queue."""

    def __init__(self, settings: SandboxSettings, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self._agents = {a.id: AgentState(a) for a in settings.agents}
        self._visitors: dict[str, _VisitorEntry] = {}
        self._tokens: collections.OrderedDict[str, tuple[Visitor, float]] = (
            collections.OrderedDict())
        self._queue: list[ChatSession] = []
        self._ids = itertools.count(1)
        self._msg_ids = itertools.count(1)
        self._closed = False

    # ------------------------------------------------------------ visitor tokens

    def register_visitor(self, visitor: Visitor) -> str:
        """A fresh ``ccmessaging-token`` for ``visitor`` (random, kept ``visitor_ttl``)."""
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (visitor, self._clock() + self.settings.visitor_ttl)
        while len(self._tokens) > _MAX_VISITOR_TOKENS:
            self._tokens.popitem(last=False)
        entry = self._visitors.get(visitor.user_id)
        if entry is not None:
            entry.visitor = visitor  # the display name may have changed since
        return token

    def lookup_visitor(self, token: str) -> Visitor | None:
        found = self._tokens.get(token)
        if found is None:
            return None
        visitor, expires = found
        if expires <= self._clock():
            del self._tokens[token]
            return None
        return visitor

    # ------------------------------------------------------------ visitor side

    def _entry(self, visitor: Visitor) -> _VisitorEntry:
        entry = self._visitors.get(visitor.user_id)
        if entry is None:
            entry = self._visitors[visitor.user_id] = _VisitorEntry(visitor)
        return entry

    def attach_visitor(self, visitor: Visitor, sink: Sink) -> ChatSession:
        """A visitor connection opened: resume the current chat or start one; send ``hello``."""
        entry = self._entry(visitor)
        session = entry.session
        if session is None:
            # Begin before attaching, so that this connection's hello shows where the chat
            # stands (robot, queued, assigned or refused) instead of a blank new chat.
            session = self._new_session(entry)
            if entry.sinks:
                _send(entry.sinks, self._hello(entry))
            self._begin(session)
        entry.sinks.append(sink)
        self._cancel_gone(entry)
        sink(self._hello(entry))
        return session

    def detach_visitor(self, visitor: Visitor, sink: Sink) -> None:
        """A visitor connection closed (or its page said it is leaving)."""
        entry = self._visitors.get(visitor.user_id)
        if entry is not None and sink in entry.sinks:
            entry.sinks.remove(sink)
            if not entry.sinks:
                self._start_gone(entry)

    def awaiting_return(self, visitor: Visitor) -> bool:
        """Whether the visitor's chat is counting down for them to come back."""
        entry = self._visitors.get(visitor.user_id)
        return entry is not None and entry.gone is not None

    def current_session(self, visitor: Visitor) -> ChatSession | None:
        entry = self._visitors.get(visitor.user_id)
        return entry.session if entry else None

    def visitor_start(self, visitor: Visitor) -> ChatSession:
        """Start a new chat unless one is still running."""
        entry = self._entry(visitor)
        if entry.session is not None and entry.session.state != "ended":
            return entry.session
        session = self._new_session(entry)
        _send(entry.sinks, self._hello(entry))
        self._begin(session)
        return session

    def visitor_message(self, visitor: Visitor, text: object) -> None:
        text = self._clean_text(text)
        entry = self._entry(visitor)
        session = entry.session
        if session is None or session.state == "ended":
            # Writing after the end starts a new chat, as the real widget does.
            session = self._new_session(entry)
            _send(entry.sinks, self._hello(entry))
            self._post(session, "visitor", visitor.user_name, text)
            self._begin(session)
            return
        self._post(session, "visitor", visitor.user_name, text)
        if session.state == "robot":
            robot = self.settings.robot
            if robot.handover_keyword in text:
                self._post(session, "robot", robot.name, robot.handover_message)
                self._request_agent(session)
            else:
                self._post(session, "robot", robot.name, robot.default_reply)

    def visitor_end(self, visitor: Visitor) -> None:
        session = self.current_session(visitor)
        if session is None or session.state == "ended":
            raise ChatError("there is no chat to end")
        self._end(session, "visitor")

    def visitor_rate(self, visitor: Visitor, stars: object, comment: object) -> Rating:
        """Rate the agent of the current (or just ended) chat; the last rating wins."""
        if isinstance(stars, bool) or not isinstance(stars, int) or not 1 <= stars <= 5:
            raise ChatError("a rating is 1 to 5 stars")
        if comment is None:
            comment = ""
        if not isinstance(comment, str):
            raise ChatError("the comment must be text")
        comment = comment.strip()[:MAX_COMMENT_LENGTH]
        session = self.current_session(visitor)
        if session is None or session.agent_id is None:
            raise ChatError("no agent has served this chat yet")
        session.rating = Rating(stars, comment)
        event = {"type": "rating", "chat": session.id, **session.rating.to_json()}
        _send(self._entry(visitor).sinks, event)
        agent = self._agents.get(session.agent_id)
        if agent is not None:
            _send(agent.sinks, event)
        return session.rating

    # ------------------------------------------------------------ agent side

    def authenticate_agent(self, agent_id: object, password: object) -> AgentAccount | None:
        if not isinstance(agent_id, str) or not isinstance(password, str):
            return None
        agent = self._agents.get(agent_id)
        if agent is None:
            # Compare anyway so that unknown ids take as long as wrong passwords.
            hmac.compare_digest(password.encode(), b"-" * len(password.encode()))
            return None
        expected = agent.account.password.get_secret_value().encode()
        return agent.account if hmac.compare_digest(password.encode(), expected) else None

    def agent(self, agent_id: str) -> AgentState:
        return self._agents[agent_id]

    def attach_agent(self, agent_id: str, sink: Sink) -> None:
        """An agent connection signed in; it gets a snapshot of the agent's chats."""
        agent = self._agents[agent_id]
        agent.sinks.append(sink)
        if agent.status == "offline":
            agent.status = "rest"  # signed in but not ready until the agent goes idle
        ended = [s for s in agent.recent if s.state == "ended"]
        sink({
            "type": "welcome",
            "agent": {"id": agent.account.id, "name": agent.account.name},
            "skillQueue": self.settings.skill_queue,
            "status": agent.status,
            "maxChats": agent.account.max_chats,
            "queueLength": len(self._queue),
            "chats": [s.to_json(agent.account.name) for s in [*ended, *agent.chats.values()]],
        })

    def detach_agent(self, agent_id: str, sink: Sink) -> None:
        agent = self._agents[agent_id]
        if sink in agent.sinks:
            agent.sinks.remove(sink)
        if not agent.sinks:
            # Chats stay with the agent (a reload reconnects); no new ones while away.
            agent.status = "offline"

    def set_agent_status(self, agent_id: str, status: object) -> None:
        if status not in ("idle", "rest"):
            raise ChatError("the status is idle or rest")
        agent = self._agents[agent_id]
        if status == "idle" and agent.status != "idle":
            agent.idle_since = self._clock()
        agent.status = "idle" if status == "idle" else "rest"
        _send(agent.sinks, {"type": "status", "status": agent.status})
        self._dispatch()

    def agent_message(self, agent_id: str, chat_id: object, text: object) -> None:
        session = self._agent_chat(agent_id, chat_id)
        if session.state != "active":
            raise ChatError("the chat has ended")
        self._post(session, "agent", self._agents[agent_id].account.name, self._clean_text(text))

    def agent_end(self, agent_id: str, chat_id: object) -> None:
        session = self._agent_chat(agent_id, chat_id)
        if session.state != "ended":
            self._end(session, "agent")

    def _agent_chat(self, agent_id: str, chat_id: object) -> ChatSession:
        agent = self._agents[agent_id]
        if isinstance(chat_id, str):
            if chat_id in agent.chats:
                return agent.chats[chat_id]
            for session in agent.recent:
                if session.id == chat_id:
                    return session
        raise ChatError("no such chat")

    # ------------------------------------------------------------ introspection

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def queue_position(self, session: ChatSession) -> int | None:
        try:
            return self._queue.index(session) + 1
        except ValueError:
            return None

    async def close(self) -> None:
        """Stop every timer (the app's cleanup calls this)."""
        self._closed = True
        tasks = [e.session.task for e in self._visitors.values()
                 if e.session is not None and e.session.task is not None]
        tasks += [e.gone for e in self._visitors.values() if e.gone is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------ internals

    def _clean_text(self, text: object) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ChatError("a message needs some text")
        if len(text) > self.settings.max_message_length:
            raise ChatError("the message is too long")
        return text.strip()

    def _hello(self, entry: _VisitorEntry) -> Event:
        session = entry.session
        agent_name = None
        if session is not None and session.agent_id is not None:
            agent_name = self._agents[session.agent_id].account.name
        return {
            "type": "hello",
            "visitor": {"id": entry.visitor.user_id, "name": entry.visitor.user_name},
            "chat": session.to_json(agent_name) if session else None,
        }

    def _new_session(self, entry: _VisitorEntry) -> ChatSession:
        old = entry.session
        if old is not None and old.state != "ended":
            self._end(old, "replaced")
        session = ChatSession(id=f"c{next(self._ids)}-{secrets.token_hex(4)}",
                              visitor=entry.visitor, last_activity=self._clock())
        entry.session = session
        return session

    def _begin(self, session: ChatSession) -> None:
        robot = self.settings.robot
        if robot.enabled:
            self._set_state(session, "robot")
            self._post(session, "robot", robot.name, robot.greeting)
            self._watch(session)
        else:
            self._request_agent(session)

    def _visitor_sinks(self, session: ChatSession) -> list[Sink]:
        entry = self._visitors.get(session.visitor.user_id)
        if entry is None or entry.session is not session:
            return []
        return entry.sinks

    def _agent_sinks(self, session: ChatSession) -> list[Sink]:
        if session.agent_id is None:
            return []
        return self._agents[session.agent_id].sinks

    def _post(self, session: ChatSession, sender: Sender, name: str, text: str) -> Message:
        msg = Message(next(self._msg_ids), sender, name, text,
                      int(self._wall_clock().timestamp() * 1000))
        session.messages.append(msg)
        if sender in ("visitor", "agent"):
            session.last_activity = self._clock()
        event = {"type": "message", "chat": session.id, **msg.to_json()}
        _send(self._visitor_sinks(session), event)
        _send(self._agent_sinks(session), event)
        return msg

    def _set_state(self, session: ChatSession, state: ChatState) -> None:
        session.state = state
        agent_name = (self._agents[session.agent_id].account.name
                      if session.agent_id is not None else None)
        event: Event = {"type": "state", "chat": session.id, "state": state,
                        "agent": {"name": agent_name} if agent_name else None}
        if state == "queued":
            event["position"] = self.queue_position(session)
        if state == "ended":
            event["reason"] = session.end_reason
        _send(self._visitor_sinks(session), event)

    def _request_agent(self, session: ChatSession) -> None:
        s = self.settings
        if s.working_hours is not None and not s.working_hours.is_open(self._wall_clock()):
            self._post(session, "system", "", s.off_hours_message)
            self._end(session, "off_hours")
            return
        agent = self._pick_agent()
        if agent is not None and not self._queue:
            self._assign(session, agent)
            return
        if len(self._queue) >= s.max_queue:
            self._post(session, "system", "", s.queue_full_message)
            self._end(session, "queue_full")
            return
        self._queue.append(session)
        session.queued_at = self._clock()
        self._set_state(session, "queued")
        self._watch(session)
        self._broadcast_queue()

    def _pick_agent(self) -> AgentState | None:
        ready = [a for a in self._agents.values() if a.has_capacity()]
        if not ready:
            return None
        return min(ready, key=lambda a: (len(a.chats), a.idle_since))

    def _assign(self, session: ChatSession, agent: AgentState) -> None:
        if session in self._queue:
            self._queue.remove(session)
        session.agent_id = agent.account.id
        session.last_activity = self._clock()
        agent.chats[session.id] = session
        agent.recent.append(session)
        self._set_state(session, "active")
        _send(agent.sinks, {"type": "chat", "chat": session.to_json(agent.account.name)})
        self._post(session, "system", "",
                   self.settings.agent_joined_message.replace("{agent}", agent.account.name))
        self._watch(session)
        log.info("chat %s assigned to agent %s", session.id, agent.account.id)

    def _dispatch(self) -> None:
        changed = False
        while self._queue:
            agent = self._pick_agent()
            if agent is None:
                break
            self._assign(self._queue[0], agent)
            changed = True
        if changed:
            self._broadcast_queue()

    def _broadcast_queue(self) -> None:
        event = {"type": "queue", "length": len(self._queue)}
        for agent in self._agents.values():
            _send(agent.sinks, event)

    def _end(self, session: ChatSession, reason: str) -> None:
        if session.state == "ended":
            return
        was_queued = session in self._queue
        if was_queued:
            self._queue.remove(session)
        session.end_reason = reason
        self._set_state(session, "ended")
        self._stop_watch(session)
        if session.agent_id is not None:
            agent = self._agents[session.agent_id]
            agent.chats.pop(session.id, None)
            _send(agent.sinks, {"type": "ended", "chat": session.id, "reason": reason})
        log.info("chat %s ended: %s", session.id, reason)
        if was_queued:
            self._broadcast_queue()
        self._dispatch()

    # ------------------------------------------------------------ timers

    def _stop_watch(self, session: ChatSession) -> None:
        task, session.task = session.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _watch(self, session: ChatSession) -> None:
        """(Re)start the one timer task of a chat for its current state."""
        self._stop_watch(session)
        if self._closed:
            return
        coro = self._queue_timer(session) if session.state == "queued" \
            else self._idle_timer(session)
        session.task = asyncio.get_running_loop().create_task(coro)

    async def _idle_timer(self, session: ChatSession) -> None:
        timeout = self.settings.session_timeout
        while session.state in ("robot", "active"):
            remaining = session.last_activity + timeout - self._clock()
            if remaining <= 0:
                self._post(session, "system", "", self.settings.session_end_message)
                self._end(session, "timeout")
                return
            await asyncio.sleep(remaining)

    async def _queue_timer(self, session: ChatSession) -> None:
        s = self.settings
        deadline = session.queued_at + s.max_wait
        next_reminder = self._clock()
        while session.state == "queued":
            now = self._clock()
            if now >= deadline:
                self._post(session, "system", "", s.queue_timeout_message)
                self._end(session, "queue_timeout")
                return
            if now >= next_reminder:
                position = self.queue_position(session) or 0
                ready = any(a.status == "idle" for a in self._agents.values())
                text = s.queue_reminder_text if ready else s.queue_no_agent_text
                self._post(session, "system", "", text.replace("{position}", str(position)))
                next_reminder = now + s.queue_reminder_interval
            await asyncio.sleep(max(0.0, min(next_reminder, deadline) - now))

    # ------------------------------------------------------------ visitors who left

    def _start_gone(self, entry: _VisitorEntry) -> None:
        session = entry.session
        if self._closed or session is None or session.state == "ended":
            return
        self._cancel_gone(entry)
        entry.gone = asyncio.get_running_loop().create_task(self._gone_timer(entry, session))

    def _cancel_gone(self, entry: _VisitorEntry) -> None:
        task, entry.gone = entry.gone, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _gone_timer(self, entry: _VisitorEntry, session: ChatSession) -> None:
        await asyncio.sleep(self.settings.visitor_gone_timeout)
        entry.gone = None
        if entry.sinks or entry.session is not session or session.state == "ended":
            return
        # Nobody is reading: leave the queue, free the agent's slot, tell the agent why.
        self._post(session, "system", "", "The visitor left (their page was closed).")
        self._end(session, "visitor_left")
