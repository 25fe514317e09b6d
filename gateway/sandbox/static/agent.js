/* CEC sandbox agent console: sign in, go idle, receive chats, reply, see ratings.
 *
 * Everything that comes from visitors is rendered with textContent only.
 */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var ws = null;
  var creds = null;
  var attempts = 0;
  var reconnectTimer = null;
  var chats = {};      /* id -> {data, item} */
  var order = [];
  var selected = null;
  var errorTimer = null;

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

  function showError(text) {
    var box = $("agent-error");
    box.textContent = text;
    box.hidden = false;
    if (errorTimer) { window.clearTimeout(errorTimer); }
    errorTimer = window.setTimeout(function () { box.hidden = true; }, 5000);
  }

  function wsUrl() {
    var url = new URL("ws", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  function transmit(obj) {
    if (ws && ws.readyState === 1) { ws.send(JSON.stringify(obj)); return true; }
    showError("Not connected; retrying…");
    return false;
  }

  /* ---- chats ---- */
  var END_REASONS = {
    visitor: "ended by the visitor", agent: "ended by you", replaced: "replaced by a new chat",
    timeout: "ended: nobody wrote for a while", visitor_left: "ended: the visitor left",
    off_hours: "ended: off hours", queue_full: "ended: queue full",
    queue_timeout: "ended: waited too long"
  };

  function stateLabel(data) {
    if (data.state === "ended") {
      return END_REASONS[data.endReason] || ("ended" + (data.endReason ? " (" + data.endReason + ")" : ""));
    }
    return data.state;
  }

  /* What the visitors are told follows from this: "all agents are busy" while an idle agent
   * is full, "no agent is available" while nobody is idle. */
  var maxChats = 0;
  var agentStatus = "rest";
  function renderLoad() {
    var active = order.filter(function (id) { return chats[id].data.state !== "ended"; }).length;
    var node = $("agent-load");
    var full = maxChats > 0 && active >= maxChats;
    node.textContent = active + "/" + maxChats + (full ? " (full)" : "");
    node.setAttribute("data-active", String(active));
    node.setAttribute("data-full", full ? "true" : "false");
    var status = $("agent-status");
    status.textContent = agentStatus === "idle" && full ? "idle, full: new visitors wait" : agentStatus;
  }

  function ratingText(r) {
    return r ? "★".repeat(r.stars) + "☆".repeat(5 - r.stars) + " (" + r.stars + "/5)" : "";
  }

  function renderItem(chat) {
    var d = chat.data;
    var item = chat.item;
    while (item.firstChild) { item.removeChild(item.firstChild); }
    item.setAttribute("data-state", d.state);
    item.appendChild(el("span", { "class": "agent-chat-visitor" }, d.visitor.name));
    item.appendChild(el("span", { "class": "agent-chat-state" }, stateLabel(d)));
    if (d.rating) {
      item.appendChild(el("span", { "class": "agent-chat-rating",
        "data-stars": String(d.rating.stars) }, ratingText(d.rating)));
    }
    item.classList.toggle("selected", selected === d.id);
  }

  function addChat(data) {
    var chat = chats[data.id];
    if (!chat) {
      var item = el("li", { "class": "agent-chat-item", "data-chat-id": data.id,
        "data-testid": "agent-chat-item", tabindex: "0" });
      item.addEventListener("click", function () { select(data.id); });
      item.addEventListener("keydown", function (e) {
        if (e.key === "Enter") { select(data.id); }
      });
      chat = chats[data.id] = { data: data, item: item, unread: false };
      order.push(data.id);
      $("agent-chat-list").appendChild(item);
    } else {
      chat.data = data;
    }
    $("agent-no-chats").hidden = true;
    renderItem(chat);
    renderLoad();
    var current = selected && chats[selected];
    if (!current || (current.data.state === "ended" && data.state !== "ended")) {
      select(data.id);
    } else if (selected === data.id) {
      renderPane();
    }
  }

  function messageNode(m) {
    var from = ["visitor", "agent", "robot", "system"].indexOf(m.from) >= 0 ? m.from : "system";
    var node = el("div", { "class": "agent-msg agent-msg-" + from, "data-msg-id": String(m.id),
      "data-from": from });
    if (m.name && from !== "system") {
      node.appendChild(el("div", { "class": "agent-msg-name" }, m.name));
    }
    node.appendChild(el("div", { "class": "agent-msg-text" }, m.text));
    return node;
  }

  function renderPane() {
    var pane = $("agent-chat");
    var chat = selected && chats[selected];
    if (!chat) { pane.hidden = true; pane.setAttribute("data-chat-id", ""); return; }
    var d = chat.data;
    pane.hidden = false;
    pane.setAttribute("data-chat-id", d.id);
    pane.setAttribute("data-state", d.state);
    $("agent-chat-visitor").textContent = d.visitor.name;
    $("agent-chat-visitor-id").textContent = "(" + d.visitor.id + ")";
    $("agent-chat-state").textContent = stateLabel(d);
    var box = $("agent-messages");
    while (box.firstChild) { box.removeChild(box.firstChild); }
    d.messages.forEach(function (m) { box.appendChild(messageNode(m)); });
    box.scrollTop = box.scrollHeight;
    var rating = $("agent-rating");
    if (d.rating) {
      rating.hidden = false;
      rating.setAttribute("data-stars", String(d.rating.stars));
      $("agent-rating-stars").textContent = ratingText(d.rating);
      $("agent-rating-comment").textContent = d.rating.comment;
    } else {
      rating.hidden = true;
      rating.setAttribute("data-stars", "");
      $("agent-rating-stars").textContent = "";
      $("agent-rating-comment").textContent = "";
    }
    var ended = d.state === "ended";
    $("agent-input").disabled = ended;
    $("agent-send").disabled = ended;
    $("agent-end").disabled = ended;
  }

  function select(id) {
    selected = id;
    if (chats[id]) { chats[id].item.classList.remove("unread"); }
    order.forEach(function (cid) { chats[cid].item.classList.toggle("selected", cid === id); });
    renderPane();
  }

  /* ---- events ---- */
  function handle(ev) {
    var chat = ev.chat && typeof ev.chat === "string" ? chats[ev.chat] : null;
    switch (ev.type) {
      case "welcome":
        attempts = 0;
        $("agent-login").hidden = true;
        $("agent-main").hidden = false;
        $("agent-bar").hidden = false;
        $("agent-name").textContent = ev.agent.name + " (" + ev.agent.id + ")";
        $("agent-skill-queue").textContent = ev.skillQueue;
        maxChats = ev.maxChats || 0;
        setStatus(ev.status);
        $("agent-queue-length").textContent = String(ev.queueLength);
        (ev.chats || []).forEach(addChat);
        break;
      case "login_failed":
        creds = null;
        $("agent-login-error").textContent = ev.message;
        break;
      case "status":
        setStatus(ev.status);
        break;
      case "queue":
        $("agent-queue-length").textContent = String(ev.length);
        break;
      case "chat":
        addChat(ev.chat);
        break;
      case "message":
        if (chat) {
          if (!chat.data.messages.some(function (m) { return m.id === ev.id; })) {
            chat.data.messages.push({ id: ev.id, from: ev.from, name: ev.name, text: ev.text,
              ts: ev.ts });
          }
          if (selected === ev.chat) {
            var box = $("agent-messages");
            box.appendChild(messageNode(ev));
            box.scrollTop = box.scrollHeight;
          } else {
            chat.item.classList.add("unread");
          }
        }
        break;
      case "ended":
        if (chat) {
          chat.data.state = "ended";
          chat.data.endReason = ev.reason;
          renderItem(chat);
          renderLoad();
          if (selected === ev.chat) { renderPane(); }
        }
        break;
      case "rating":
        if (chat) {
          chat.data.rating = { stars: ev.stars, comment: ev.comment };
          renderItem(chat);
          if (selected === ev.chat) { renderPane(); }
        }
        break;
      case "error":
        showError(ev.message);
        break;
      default:
        break;
    }
  }

  function setStatus(status) {
    var node = $("agent-status");
    agentStatus = status;
    node.setAttribute("data-status", status);
    renderLoad();
    $("agent-status-idle").disabled = status === "idle";
    $("agent-status-rest").disabled = status === "rest";
  }

  /* ---- connection ---- */
  function scheduleReconnect() {
    if (!creds || reconnectTimer) { return; }
    var delay = Math.min(10000, 500 * Math.pow(2, attempts));
    attempts += 1;
    reconnectTimer = window.setTimeout(function () { reconnectTimer = null; connect(); }, delay);
  }

  function connect() {
    if (ws && (ws.readyState === 0 || ws.readyState === 1)) {
      if (ws.readyState === 1 && creds) {
        ws.send(JSON.stringify({ type: "login", id: creds.id, password: creds.password }));
      }
      return;
    }
    var sock = new WebSocket(wsUrl());
    ws = sock;
    sock.onopen = function () {
      $("agent-conn").setAttribute("data-connected", "true");
      if (creds) {
        sock.send(JSON.stringify({ type: "login", id: creds.id, password: creds.password }));
      }
    };
    sock.onmessage = function (msg) {
      var ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      if (ev && typeof ev === "object") { handle(ev); }
    };
    sock.onclose = function (ev) {
      if (ws !== sock) { return; }
      ws = null;
      $("agent-conn").setAttribute("data-connected", "false");
      if (ev.code === 4401) {
        creds = null;
        $("agent-main").hidden = true;
        $("agent-bar").hidden = true;
        $("agent-login").hidden = false;
        return;
      }
      scheduleReconnect();
    };
  }

  /* ---- wiring ---- */
  $("agent-login-form").addEventListener("submit", function (e) {
    e.preventDefault();
    $("agent-login-error").textContent = "";
    /* Kept in memory only, so that a dropped connection can sign in again (sandbox only). */
    creds = { id: $("agent-id").value.trim(), password: $("agent-password").value };
    connect();
  });
  $("agent-status-idle").addEventListener("click", function () {
    transmit({ type: "status", status: "idle" });
  });
  $("agent-status-rest").addEventListener("click", function () {
    transmit({ type: "status", status: "rest" });
  });
  $("agent-form").addEventListener("submit", function (e) {
    e.preventDefault();
    var input = $("agent-input");
    var text = input.value.trim();
    if (!text || !selected) { return; }
    if (transmit({ type: "message", chat: selected, text: text })) { input.value = ""; }
  });
  $("agent-input").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("agent-form").requestSubmit();
    }
  });
  $("agent-end").addEventListener("click", function () {
    if (selected) { transmit({ type: "end", chat: selected }); }
  });
})();
