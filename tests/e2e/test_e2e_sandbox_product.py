"""The sandbox chat as a demo user meets it, in headless Chromium through the gateway.

- Ending a chat (by the agent or the visitor) closes it on both screens; the visitor's next
  message starts a chat that is visibly new (its own id, a "New chat" mark, the old messages
  and the old rating panel gone) and reaches the agent as a new chat.
- A visitor whose page is gone leaves the queue and frees the agent's slot within
  ``visitor_gone_timeout``; while waiting, visitors are told what the console shows (nobody
  ready, or ready but full).
- No page of the demo makes the browser complain (the favicon of ``/chat/``).

Screenshots of each step go to ``$GATEWAY_SCREENSHOTS`` (default: a temporary directory).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.sandbox.settings import AgentAccount
from tests.e2e.conftest import run_stack
from tests.e2e.test_e2e_chat import agent_sign_in, assert_quiet, exchange, open_widget

expect = pytest.importorskip("playwright.async_api").expect

ONE_SLOT = [AgentAccount(id="agent1", name="Agent One", password=SecretStr("agent1"),
                         max_chats=1)]


@pytest.fixture(scope="module")
def shots() -> Path:
    """Where the screenshots go ($GATEWAY_SCREENSHOTS, else a new temporary directory)."""
    path = Path(os.environ.get("GATEWAY_SCREENSHOTS") or tempfile.mkdtemp(prefix="gw-shots-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


async def shot(page: Any, folder: Path, name: str) -> None:
    await page.screenshot(path=str(folder / f"{name}.png"))


async def test_an_ended_chat_closes_for_both_and_the_next_message_starts_a_new_one(
        open_page: Any, shots: Path) -> None:
    async with run_stack("authorization") as stack:
        agent_ctx, agent, agent_watch = await open_page()
        await agent_sign_in(agent, stack)
        ctx, visitor, watch = await open_page()
        await visitor.goto(stack.gateway + "/")
        await open_widget(visitor)
        window = visitor.locator("#cec-chat-window")
        first_id = await window.get_attribute("data-chat-id")
        assert first_id
        await exchange(visitor, agent, "My order is late.", "Let me check that for you.")
        await expect(agent.locator("#agent-load")).to_have_text("1/3")

        # The agent ends it: closed on both sides, the visitor is told how to go on.
        await agent.click("#agent-end")
        await expect(window).to_have_attribute("data-state", "ended")
        await expect(visitor.locator("#cec-chat-status")).to_have_text("Chat ended")
        await expect(visitor.locator(".cec-msg-ended")).to_have_text(
            "This chat has ended. Write a message to start a new chat.")
        await expect(visitor.locator("#cec-chat-input")).to_have_attribute(
            "placeholder", "Write to start a new chat…")
        await expect(visitor.locator("#cec-rating")).to_be_visible()  # rate the agent now
        await expect(agent.locator("#agent-chat-state")).to_have_text("ended by you")
        await expect(agent.locator("#agent-input")).to_be_disabled()
        await expect(agent.locator("#agent-send")).to_be_disabled()
        await expect(agent.locator("#agent-load")).to_have_text("0/3")
        await shot(visitor, shots, "1-visitor-after-agent-ended")

        # Writing again starts a visibly new chat; the old rating panel does not stay on top.
        await visitor.fill("#cec-chat-input", "One more question.")
        await visitor.click("#cec-chat-send")
        await expect(window).to_have_attribute("data-state", "active")
        second_id = await window.get_attribute("data-chat-id")
        assert second_id and second_id != first_id
        await expect(visitor.locator("#cec-rating")).to_be_hidden()
        await expect(visitor.locator(".cec-msg-new-chat")).to_have_text("New chat")
        await expect(visitor.locator(".cec-msg-ended")).to_have_count(0)
        visitor_texts = await visitor.locator(
            "#cec-chat-messages .cec-msg-visitor .cec-msg-text").all_text_contents()
        assert visitor_texts == ["One more question."]  # nothing of the old chat
        await expect(visitor.locator("#cec-chat-input")).to_have_attribute(
            "placeholder", "Type a message…")
        # The agent gets it as a new chat, the old one stays ended in the list.
        await expect(agent.locator("#agent-chat")).to_have_attribute("data-chat-id", second_id)
        await expect(agent.locator("#agent-messages .agent-msg-visitor").last
                     ).to_contain_text("One more question.")
        await expect(agent.locator(f'li[data-chat-id="{first_id}"]')).to_contain_text(
            "ended by you")
        await expect(agent.locator("#agent-input")).to_be_enabled()
        await shot(visitor, shots, "2-visitor-new-chat")
        await shot(agent, shots, "3-console-new-chat")

        # The visitor ends this one: the agent's side closes too.
        await visitor.click("#cec-chat-end")
        await expect(window).to_have_attribute("data-state", "ended")
        await expect(agent.locator("#agent-chat-state")).to_have_text("ended by the visitor")
        await expect(agent.locator("#agent-input")).to_be_disabled()
        await shot(agent, shots, "4-console-visitor-ended")
        assert_quiet(watch, agent_watch)
        for c in (ctx, agent_ctx):
            await c.close()


async def test_a_visitor_who_left_frees_the_queue_and_the_slot_and_waiting_is_told_truly(
        open_page: Any, shots: Path) -> None:
    async with run_stack("authorization", agents=ONE_SLOT, visitor_gone_timeout=1.0,
                         queue_reminder_interval=0.5) as stack:
        agent_ctx, agent, agent_watch = await open_page()
        await agent_sign_in(agent, stack)
        await agent.click("#agent-status-rest")
        await expect(agent.locator("#agent-status")).to_have_attribute("data-status", "rest")

        # Nobody is ready: the visitor waits and is told so (not "all agents are busy").
        ann_ctx, ann, ann_watch = await open_page()
        await ann.goto(stack.gateway + "/")
        await ann.click("#cec-chat-button")
        await expect(ann.locator("#cec-chat-window")).to_have_attribute("data-state", "queued")
        await expect(ann.locator("#cec-chat-messages .cec-msg-system").first).to_contain_text(
            "No agent is available right now. You are number 1")
        await expect(agent.locator("#agent-queue-length")).to_have_text("1")
        await expect(agent.locator("#agent-status")).to_have_text("rest")
        await shot(ann, shots, "5-visitor-no-agent")

        # The agent goes idle: takes Ann, and is then full, as the console says.
        await agent.click("#agent-status-idle")
        await expect(ann.locator("#cec-chat-window")).to_have_attribute("data-state", "active")
        await expect(agent.locator("#agent-load")).to_have_text("1/1 (full)")
        await expect(agent.locator("#agent-status")).to_have_text(
            "idle, full: new visitors wait")
        await expect(agent.locator("#agent-queue-length")).to_have_text("0")

        # Bob comes: all agents (the one) busy, and that is what he reads.
        bob_ctx, bob, bob_watch = await open_page()
        await bob.goto(stack.gateway + "/products")
        await bob.click("#cec-chat-button")
        await expect(bob.locator("#cec-chat-window")).to_have_attribute("data-state", "queued")
        await expect(bob.locator("#cec-chat-messages .cec-msg-system").first).to_contain_text(
            "All agents are busy. You are number 1")
        await expect(agent.locator("#agent-queue-length")).to_have_text("1")
        await shot(bob, shots, "6-visitor-busy")
        await shot(agent, shots, "7-console-full")

        # The pagehide beacon names the page's connection and closes it at once; a page that
        # is still there (a page restored from the back/forward cache, here a synthetic
        # pagehide) reconnects in time and keeps its chat.
        ann_chat = await ann.locator("#cec-chat-window").get_attribute("data-chat-id")
        sockets: list[Any] = []
        ann.on("websocket", lambda ws: sockets.append(ws))
        async with ann.expect_request(lambda r: r.url.endswith("/webclient/leave")) as leave:
            await ann.evaluate("window.dispatchEvent(new PageTransitionEvent('pagehide'))")
        request = await leave.value
        assert request.url == stack.gateway + "/service-cloud/webclient/leave"
        assert request.method == "POST" and '"connection":' in (request.post_data or "")
        await expect(ann.locator("#cec-chat-window")).to_have_attribute(
            "data-connected", "false")
        await expect(ann.locator("#cec-chat-window")).to_have_attribute(
            "data-connected", "true")
        assert len(sockets) == 1  # a new connection, after the beacon closed the old one
        await expect(ann.locator("#cec-chat-window")).to_have_attribute("data-state", "active")
        assert await ann.locator("#cec-chat-window").get_attribute("data-chat-id") == ann_chat

        # Ann's tab goes elsewhere for good: within the timeout her chat ends and Bob gets
        # the agent.
        await ann.goto(stack.allowed_origin + "/")
        await expect(bob.locator("#cec-chat-window")).to_have_attribute(
            "data-state", "active", timeout=8_000)
        await expect(agent.locator("#agent-load")).to_have_text("1/1 (full)")
        await expect(agent.locator("#agent-queue-length")).to_have_text("0")
        ended = agent.locator('li.agent-chat-item[data-state="ended"]')
        await expect(ended).to_have_count(1)
        await expect(ended).to_contain_text("ended: the visitor left")
        await exchange(bob, agent, "Finally my turn.", "Hello Bob!")
        await shot(agent, shots, "8-console-after-visitor-left")

        # Bob closes his tab: the slot is free again (console and hub agree).
        await bob.close()
        await expect(agent.locator("#agent-load")).to_have_text("0/1", timeout=8_000)
        await expect(agent.locator("#agent-status")).to_have_text("idle")
        assert_quiet(ann_watch, bob_watch, agent_watch)
        for c in (ann_ctx, bob_ctx, agent_ctx):
            await c.close()


async def test_no_page_of_the_demo_makes_the_browser_complain(open_page: Any,
                                                             shots: Path) -> None:
    async with run_stack("authorization") as stack:
        _ctx, page, watch = await open_page()
        failed: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}")
                if r.status >= 400 else None)
        assert stack.config.cec is not None and stack.config.cec.page_path == "/chat/"
        for path in ("/chat/", "/", "/service-cloud/agent/"):
            await page.goto(stack.gateway + path)
            await page.wait_for_load_state("networkidle")
        await page.goto(stack.gateway + "/chat/")
        await open_widget_anywhere(page)
        await shot(page, shots, "9-chat-page")
        assert failed == [], failed
        assert_quiet(watch)


async def open_widget_anywhere(page: Any) -> None:
    """The widget on the gateway's own /chat/ page opens and connects (no agent needed)."""
    await page.click("#cec-chat-button")
    await expect(page.locator("#cec-chat-window")).to_have_attribute("data-connected", "true")
