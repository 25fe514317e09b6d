/* CEC sandbox chat widget: a round button that opens a chat window.
 *
 * Talks to the sandbox over a WebSocket at <base>/webclient/ws, authenticated by the
 * HttpOnly ccmessaging-token cookie. Everything that comes from users (names, messages,
 * comments) is rendered with textContent only; this file never uses innerHTML.
 * Stable ids and data-testid attributes are part of the contract with the browser tests.
 */
(function () {
  "use strict";
  if (window.__cecSandboxWidget) { return; }

  var TEXT = {
    en: {
      open: "Chat with us", title: "Online service", close: "Close", end: "End chat",
      rate: "Rate", send: "Send", placeholder: "Type a message…", newChat: "New chat",
      ratingTitle: "How was our service?", commentPlaceholder: "Comment (optional)",
      submit: "Submit rating", rated: "Thank you! You rated ", of5: "/5",
      unauthorized: "The chat session has expired. Please reload the page.",
      reconnecting: "Connection lost, reconnecting…", star: " star(s)",
      ended: "This chat has ended. Write a message to start a new chat.",
      newChatStarted: "New chat", placeholderEnded: "Write to start a new chat…",
      states: { connecting: "Connecting…", "new": "Starting…", robot: "Robot",
        queued: "Waiting for an agent", active: "Chatting with ", ended: "Chat ended",
        unauthorized: "Not signed in" }
    },
    zh: {
      open: "在线客服", title: "在线客服", close: "关闭", end: "结束会话", rate: "评价",
      send: "发送", placeholder: "请输入消息…", newChat: "新会话",
      ratingTitle: "请对本次服务进行评价", commentPlaceholder: "评价内容（可选）",
      submit: "确认", rated: "感谢您的评价：", of5: "/5",
      unauthorized: "会话已失效，请刷新页面。", reconnecting: "连接中断，正在重连…",
      star: " 星", ended: "本次会话已结束。发送消息即可开始新的会话。",
      newChatStarted: "新会话", placeholderEnded: "发送消息开始新的会话…",
      states: { connecting: "连接中…", "new": "正在接入…", robot: "机器人",
        queued: "排队中", active: "正在与座席交谈：", ended: "会话已结束",
        unauthorized: "未认证" }
    }
  };

  var cfg = window.__cecSandboxConfig || {};
  var t = TEXT[cfg.locale] || TEXT.zh;
  var ws = null;
  var attempts = 0;
  var reconnectTimer = null;
  var stopped = false;
  var outbox = [];
  var seen = {};
  var state = "connecting";
  var agentName = "";
  var selectedStars = 0;
  var chatId = null;       /* the chat on screen; another id in a hello is a new chat */
  var connectionId = null; /* this page's connection, named by the leave beacon */

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    var name;
    for (name in attrs) {
      if (Object.prototype.hasOwnProperty.call(attrs, name)) {
        if (name === "class") { node.className = attrs[name]; }
        else { node.setAttribute(name, attrs[name]); }
      }
    }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  /* ---- DOM ---- */
  var root = el("div", { id: "cec-widget", "data-testid": "cec-widget" });
  var button = el("button", { id: "cec-chat-button", type: "button",
    "data-testid": "cec-chat-button", "aria-label": t.open, title: t.open,
    "aria-expanded": "false", "aria-controls": "cec-chat-window" });
  button.appendChild(el("span", { "class": "cec-chat-button-icon", "aria-hidden": "true" }));

  var win = el("section", { id: "cec-chat-window", "data-testid": "cec-chat-window",
    role: "dialog", "aria-label": t.title, "data-state": "connecting",
    "data-connected": "false" });
  win.hidden = true;

  var header = el("header", { "class": "cec-chat-header" });
  var titleBox = el("div", { "class": "cec-chat-titlebox" });
  titleBox.appendChild(el("div", { id: "cec-chat-title", "class": "cec-chat-title" }, t.title));
  var status = el("div", { id: "cec-chat-status", "data-testid": "cec-chat-status",
    "class": "cec-chat-status" }, t.states.connecting);
  titleBox.appendChild(status);
  var visitorName = el("div", { id: "cec-chat-visitor-name",
    "data-testid": "cec-chat-visitor-name", "class": "cec-chat-visitor-name" });
  titleBox.appendChild(visitorName);
  header.appendChild(titleBox);
  var tools = el("div", { "class": "cec-chat-tools" });
  var rateButton = el("button", { id: "cec-chat-rate", type: "button",
    "data-testid": "cec-chat-rate" }, t.rate);
  var endButton = el("button", { id: "cec-chat-end", type: "button",
    "data-testid": "cec-chat-end" }, t.end);
  var closeButton = el("button", { id: "cec-chat-close", type: "button",
    "data-testid": "cec-chat-close", "aria-label": t.close, title: t.close }, "×");
  tools.appendChild(rateButton);
  tools.appendChild(endButton);
  tools.appendChild(closeButton);
  header.appendChild(tools);
  win.appendChild(header);

  var list = el("div", { id: "cec-chat-messages", "data-testid": "cec-chat-messages",
    "class": "cec-chat-messages", role: "log", "aria-live": "polite" });
  win.appendChild(list);

  var rating = el("div", { id: "cec-rating", "data-testid": "cec-rating",
    "class": "cec-rating" });
  rating.hidden = true;
  rating.appendChild(el("div", { "class": "cec-rating-title" }, t.ratingTitle));
  var starBox = el("div", { "class": "cec-rating-stars", role: "group",
    "aria-label": t.ratingTitle });
  var stars = [];
  for (var i = 1; i <= 5; i += 1) {
    var star = el("button", { type: "button", "class": "cec-star", "data-star": String(i),
      "data-testid": "cec-star-" + i, "aria-label": i + t.star, "aria-pressed": "false" }, "★");
    stars.push(star);
    starBox.appendChild(star);
  }
  rating.appendChild(starBox);
  var comment = el("textarea", { id: "cec-rating-comment", "data-testid": "cec-rating-comment",
    "class": "cec-rating-comment", rows: "2", maxlength: "500",
    placeholder: t.commentPlaceholder });
  rating.appendChild(comment);
  var ratingSubmit = el("button", { id: "cec-rating-submit", type: "button",
    "data-testid": "cec-rating-submit", "class": "cec-primary" }, t.submit);
  ratingSubmit.disabled = true;
  rating.appendChild(ratingSubmit);
  var ratingResult = el("div", { id: "cec-rating-result", "data-testid": "cec-rating-result",
    "class": "cec-rating-result" });
  rating.appendChild(ratingResult);
  win.appendChild(rating);

  var form = el("form", { id: "cec-chat-form", "class": "cec-chat-form" });
  var input = el("textarea", { id: "cec-chat-input", "data-testid": "cec-chat-input",
    rows: "2", placeholder: t.placeholder, "aria-label": t.placeholder });
  var send = el("button", { id: "cec-chat-send", type: "submit", "data-testid": "cec-chat-send",
    "class": "cec-primary" }, t.send);
  var newChat = el("button", { id: "cec-chat-new", type: "button",
    "data-testid": "cec-chat-new" }, t.newChat);
  newChat.hidden = true;
  form.appendChild(input);
  form.appendChild(send);
  form.appendChild(newChat);
  win.appendChild(form);

  root.appendChild(win);
  root.appendChild(button);

  /* ---- rendering ---- */
  function addMessage(m) {
    if (!m || seen[m.id]) { return; }
    seen[m.id] = true;
    var from = ["visitor", "agent", "robot", "system"].indexOf(m.from) >= 0 ? m.from : "system";
    var item = el("div", { "class": "cec-msg cec-msg-" + from, "data-msg-id": String(m.id),
      "data-from": from });
    if (m.name && from !== "system") {
      item.appendChild(el("div", { "class": "cec-msg-name" }, m.name));
    }
    item.appendChild(el("div", { "class": "cec-msg-text" }, m.text));
    list.appendChild(item);
    list.scrollTop = list.scrollHeight;
  }

  function notice(text, kind) {
    var item = el("div", { "class": "cec-msg cec-msg-system cec-msg-" + (kind || "notice") });
    item.appendChild(el("div", { "class": "cec-msg-text" }, text));
    list.appendChild(item);
    list.scrollTop = list.scrollHeight;
  }

  function resetRating() {
    rating.hidden = true;
    comment.value = "";
    ratingResult.textContent = "";
    ratingResult.removeAttribute("data-stars");
    pickStars(0);
  }

  function setState(next, agent) {
    var live = state !== next && state !== "connecting";
    state = next;
    if (agent && agent.name) { agentName = agent.name; }
    win.setAttribute("data-state", next);
    var label = t.states[next] || next;
    status.textContent = next === "active" ? label + agentName : label;
    var ended = next === "ended" || next === "unauthorized";
    endButton.disabled = ended || next === "connecting";
    newChat.hidden = next !== "ended";
    input.disabled = next === "unauthorized";
    send.disabled = next === "unauthorized";
    input.placeholder = next === "ended" ? t.placeholderEnded : t.placeholder;
    rateButton.disabled = !agentName;
    if (next === "ended" && live) { notice(t.ended, "ended"); }
    if (next === "ended" && agentName && live) { rating.hidden = false; }
  }

  function showRating(r) {
    if (!r) { return; }
    ratingResult.textContent = t.rated + r.stars + t.of5;
    ratingResult.setAttribute("data-stars", String(r.stars));
    pickStars(r.stars);
  }

  function pickStars(n) {
    selectedStars = n;
    stars.forEach(function (s, idx) {
      var on = idx < n;
      s.classList.toggle("cec-star-on", on);
      s.setAttribute("aria-pressed", on ? "true" : "false");
    });
    ratingSubmit.disabled = n < 1;
  }

  function handle(ev) {
    if (ev.type === "hello") {
      var next = ev.chat ? ev.chat.id : null;
      var fresh = chatId !== null && next !== chatId;
      seen = {};
      while (list.firstChild) { list.removeChild(list.firstChild); }
      if (ev.visitor) { visitorName.textContent = ev.visitor.name; }
      agentName = "";
      if (fresh || next === null) { resetRating(); }
      chatId = next;
      win.setAttribute("data-chat-id", next || "");
      if (fresh) { notice(t.newChatStarted, "new-chat"); }
      if (ev.chat) {
        (ev.chat.messages || []).forEach(addMessage);
        state = ev.chat.state; /* a snapshot, not a change seen live */
        setState(ev.chat.state, ev.chat.agent);
        if (ev.chat.state === "ended" && agentName && !fresh) { rating.hidden = false; }
        showRating(ev.chat.rating);
      }
    } else if (ev.type === "connection") {
      connectionId = ev.id;
    } else if (ev.type === "message") {
      addMessage(ev);
    } else if (ev.type === "state") {
      setState(ev.state, ev.agent);
    } else if (ev.type === "rating") {
      showRating(ev);
    } else if (ev.type === "error") {
      notice(ev.message, "error");
    }
  }

  /* ---- connection ---- */
  function wsUrl() {
    var base = cfg.base || (window.location.origin + (cfg.contextPath || "/service-cloud"));
    var url = new URL(base.replace(/\/+$/, "") + "/webclient/ws", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  function transmit(obj) {
    if (ws && ws.readyState === 1) { ws.send(JSON.stringify(obj)); }
    else { outbox.push(obj); connect(); }
  }

  function scheduleReconnect() {
    if (stopped || reconnectTimer) { return; }
    var delay = Math.min(10000, 500 * Math.pow(2, attempts)) * (0.75 + Math.random() * 0.5);
    attempts += 1;
    reconnectTimer = window.setTimeout(function () { reconnectTimer = null; connect(); }, delay);
  }

  function connect() {
    if (stopped || (ws && (ws.readyState === 0 || ws.readyState === 1))) { return; }
    var sock;
    try { sock = new WebSocket(wsUrl()); } catch (e) { scheduleReconnect(); return; }
    ws = sock;
    sock.onopen = function () {
      attempts = 0;
      win.setAttribute("data-connected", "true");
      var pending = outbox;
      outbox = [];
      pending.forEach(function (obj) { sock.send(JSON.stringify(obj)); });
    };
    sock.onmessage = function (msg) {
      var ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      if (ev && typeof ev === "object") { handle(ev); }
    };
    sock.onclose = function (ev) {
      if (ws !== sock) { return; }
      ws = null;
      win.setAttribute("data-connected", "false");
      if (ev.code === 4401) {
        stopped = true;
        setState("unauthorized");
        notice(t.unauthorized, "error");
        return;
      }
      if (state !== "ended") { status.textContent = t.reconnecting; }
      scheduleReconnect();
    };
  }

  /* ---- interaction ---- */
  function openWindow() {
    win.hidden = false;
    button.setAttribute("aria-expanded", "true");
    root.classList.add("cec-open");
    connect();
    input.focus();
  }

  function closeWindow() {
    win.hidden = true;
    button.setAttribute("aria-expanded", "false");
    root.classList.remove("cec-open");
  }

  button.addEventListener("click", function () {
    if (win.hidden) { openWindow(); } else { closeWindow(); }
  });
  closeButton.addEventListener("click", closeWindow);
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text) { return; }
    transmit({ type: "message", text: text });
    input.value = "";
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit ? form.requestSubmit() : send.click();
    }
  });
  endButton.addEventListener("click", function () { transmit({ type: "end" }); });
  newChat.addEventListener("click", function () { transmit({ type: "start" }); });
  rateButton.addEventListener("click", function () { rating.hidden = !rating.hidden; });
  stars.forEach(function (s) {
    s.addEventListener("click", function () {
      pickStars(parseInt(s.getAttribute("data-star"), 10));
    });
  });
  ratingSubmit.addEventListener("click", function () {
    if (selectedStars < 1) { return; }
    transmit({ type: "rate", stars: selectedStars, comment: comment.value });
  });

  /* The page is going away (closed, reloaded, navigated): say so at once, so that the chat
   * does not hold a queue place or an agent's slot until the heartbeat notices. A page that
   * comes back (a reload, the site's next page) reconnects and keeps its chat. */
  function leaveUrl() {
    var base = cfg.base || (window.location.origin + (cfg.contextPath || "/service-cloud"));
    return new URL(base.replace(/\/+$/, "") + "/webclient/leave", window.location.href).href;
  }
  window.addEventListener("pagehide", function () {
    if (connectionId && navigator.sendBeacon) {
      navigator.sendBeacon(leaveUrl(), JSON.stringify({ connection: connectionId }));
    }
  });
  window.addEventListener("pageshow", function (e) {
    if (e.persisted && !win.hidden) { connect(); } /* restored from the back/forward cache */
  });

  function mount() { (document.body || document.documentElement).appendChild(root); }
  if (document.body) { mount(); } else { document.addEventListener("DOMContentLoaded", mount); }

  window.__cecSandboxWidget = {
    /* Called when newThirdPartyClient.js runs again (a new ccmessaging-token). */
    configure: function (next) {
      cfg = next || cfg;
      stopped = false;
      attempts = 0;
      if (ws) { var old = ws; ws = null; old.close(); }
      if (!win.hidden) { connect(); }
    },
    open: openWindow,
    close: closeWindow
  };
})();
