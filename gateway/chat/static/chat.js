/*
 * CEC chat loader, served by the gateway at its loader path. Include it with one tag,
 *   script src="/gateway/chat.js" defer
 * Dependency-free on purpose (no libraries). Written in ES5 syntax so that Internet
 * Explorer can at least parse it and be told, once, that the chat does not support it.
 * The settings below are inserted by the gateway as JSON (never as pasted script text) and
 * hold no secret: the gateway signs and injects credentials on its side.
 */
(function (window, document) {
  "use strict";

  var settings = /*@CEC_GATEWAY_SETTINGS@*/null;
  var TAG = "[cec-gateway]";
  var MAX_TRIES = 6;
  var FIRST_DELAY_MS = 1000;
  var MAX_DELAY_MS = 30000;
  var console = window.console || {};

  function debug() {
    if (typeof console.debug === "function") {
      console.debug.apply(console, [TAG].concat(Array.prototype.slice.call(arguments)));
    }
  }

  // Included twice (two tags, or a tag plus a copied snippet): run once.
  if (!settings || window.__cecGatewayLoader) {
    return;
  }
  window.__cecGatewayLoader = true;

  function isInternetExplorer() {
    var ua = (window.navigator && window.navigator.userAgent) || "";
    return Boolean(document.documentMode) || /MSIE |Trident\//.test(ua);
  }

  if (isInternetExplorer()) {
    if (typeof console.warn === "function") {
      console.warn(TAG + " The online chat does not support Internet Explorer; " +
        "please use a current browser.");
    }
    return;
  }

  // Token mode needs a logged-in visitor; the gateway would refuse an anonymous one.
  if (settings.mode === "token" && !settings.userId) {
    debug("not logged in: the chat stays off");
    return;
  }

  var location = window.location;
  var contextPath = String(settings.contextPath || "");
  var base = location.protocol + "//" + location.host + contextPath;
  var clientPath = base + "/webclient/chat_client/js/";

  // The globals the CEC's scripts and the vendor's sample pages expect.
  window.$ContextPath = base;
  window.$aicc_ContextPath = base;
  window.configId = settings.configId;
  window.userId = settings.userId;
  window.userName = settings.userName;
  window.tenantSpaceId = settings.tenantSpaceId;
  window.locale = settings.locale;
  window.token = settings.token;

  var thirdUserData = {
    thirdUserName: settings.userName,
    thirdUserId: settings.userId,
    tenantSpaceId: settings.tenantSpaceId,
    channelConfigId: settings.configId,
    locale: settings.locale,
    mapService: settings.mapService
  };
  if (settings.mode === "token" && settings.token) {
    thirdUserData.thirdUserToken = settings.token;
  }
  window.thirdUserData = thirdUserData;

  function scriptParent() {
    return document.head || document.getElementsByTagName("head")[0] ||
      document.body || document.documentElement;
  }

  // Runs script text: the element's .text is set before insertion, so it runs on insert.
  function importScript(source, onload) {
    var script = document.createElement("script");
    script.type = "text/javascript";
    script.text = String(source);
    scriptParent().appendChild(script);
    if (typeof onload === "function") {
      onload();
    }
    return script;
  }
  window.importScript = importScript;

  function retryDelay(attempt) {
    return Math.min(FIRST_DELAY_MS * Math.pow(2, attempt), MAX_DELAY_MS);
  }

  // POST the data as JSON and run the answer; network failures and 5xx answers are retried
  // with exponential back-off, silently: a visitor sees no chat rather than a broken one.
  function post(file, data, attempt) {
    attempt = attempt || 0;
    var url = clientPath + file + "?&t=" + new Date().getTime();
    function again(reason) {
      if (attempt + 1 >= MAX_TRIES) {
        debug("giving up on", file, "after", attempt + 1, "tries:", reason);
        return;
      }
      var delay = retryDelay(attempt);
      debug(file, "failed (" + reason + "); retrying in", delay, "ms");
      window.setTimeout(function () { post(file, data, attempt + 1); }, delay);
    }
    window.fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json;charset=UTF-8" },
      body: JSON.stringify(data)
    }).then(function (response) {
      if (response.status >= 200 && response.status < 300) {
        return response.text().then(function (text) { importScript(text); });
      }
      if (response.status >= 500) {
        again("HTTP " + response.status);
      } else {
        debug(file, "refused with HTTP", response.status);
      }
      return undefined;
    }, function (error) {
      again(String(error && error.message || error));
    });
  }

  function thirdValidate(data) {
    var payload = data || thirdUserData;
    payload.timestamp = new Date().getTime();
    post("newThirdPartyClient.js", payload, 0);
  }
  window.thirdValidate = thirdValidate;

  function loadScript(src, done) {
    var script = document.createElement("script");
    script.src = src;
    script.async = false;
    script.onload = function () { done(); };
    script.onerror = function () { debug("could not load", src); done(); };
    scriptParent().appendChild(script);
  }

  function loadAll(sources, done) {
    if (!sources.length) {
      done();
      return;
    }
    loadScript(sources[0], function () { loadAll(sources.slice(1), done); });
  }

  function applyChatWindow() {
    thirdUserData.timestamp = new Date().getTime();
    if (settings.mode === "token") {
      // The answer defines the widget and calls thirdValidate itself.
      post("thirdPartyClient.js", thirdUserData, 0);
    } else {
      post("newThirdPartyClient.js", thirdUserData, 0);
    }
  }

  function start() {
    if (settings.cobrowse) {
      loadAll([
        base + "/resource.root/cobrowse/sdk/cobrowse.js",
        clientPath + "cobrowseCommon.js"
      ], applyChatWindow);
    } else {
      applyChatWindow();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}(window, document));
