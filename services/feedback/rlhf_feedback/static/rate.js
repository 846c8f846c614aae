// The rating page: fetch a pair, show it, send the choice, show the next pair at once.
// No external scripts; settings are kept in this browser only.
(function () {
  "use strict";
  var store = window.localStorage;
  var session = window.sessionStorage.getItem("rate-session");
  if (!session) {
    session = Math.random().toString(36).slice(2) + Date.now().toString(36);
    window.sessionStorage.setItem("rate-session", session);
  }
  var el = function (id) { return document.getElementById(id); };
  var current = null, busy = false, count = 0;

  el("rater").value = store.getItem("rate-rater") || "";
  el("apikey").value = store.getItem("rate-key") || "";
  el("settings-form").addEventListener("submit", function (e) {
    e.preventDefault();
    store.setItem("rate-rater", el("rater").value.trim());
    store.setItem("rate-key", el("apikey").value.trim());
    load();
  });

  function headers() {
    var h = { "content-type": "application/json" };
    var rater = store.getItem("rate-rater"), key = store.getItem("rate-key");
    if (rater) h["x-rater"] = rater;
    if (key) h["authorization"] = "Bearer " + key;
    return h;
  }

  function status(text, isError) {
    var s = el("status");
    s.textContent = text;
    s.className = isError ? "error" : "";
  }

  function show(pair) {
    current = pair;
    if (!pair) {
      el("pair").hidden = true;
      status("No pair is waiting. This page checks again every few seconds.");
      window.setTimeout(load, 3000);
      return;
    }
    el("prompt").textContent = pair.prompt;
    el("answer-a").textContent = pair.a;
    el("answer-b").textContent = pair.b;
    el("reason").value = "";
    el("pair").hidden = false;
    el("pair").setAttribute("data-ticket", pair.ticket);
    status("Pair ready: which answer is better?");
  }

  function call(method, path, body) {
    return fetch(path, { method: method, headers: headers(), body: body ? JSON.stringify(body) : undefined })
      .then(function (r) {
        return r.json().then(function (j) {
          if (!r.ok) {
            var msg = (j && (j.detail || j.error || j.message)) || r.statusText;
            if (r.status === 401) msg = "The service needs an API key: open Rater settings. (" + msg + ")";
            throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
          }
          return j;
        });
      });
  }

  function load() {
    status("Loading the next pair…");
    call("GET", "/v1/rate/next").then(function (j) { show(j.pair); })
      .catch(function (e) { status(e.message, true); });
  }

  function choose(choice) {
    if (!current || busy) return;
    busy = true;
    var body = { ticket: current.ticket, choice: choice, reason: el("reason").value, session_id: session };
    status("Saving…");
    call("POST", "/v1/rate/choice", body).then(function (j) {
      count += 1;
      el("count").textContent = String(count);
      busy = false;
      show(j.next);
    }).catch(function (e) { busy = false; status("Not saved: " + e.message + ". Try again.", true); });
  }

  Array.prototype.forEach.call(document.querySelectorAll(".choices button"), function (b) {
    b.addEventListener("click", function () { choose(b.getAttribute("data-choice")); });
  });

  var keys = { "1": "a", "ArrowLeft": "a", "2": "b", "ArrowRight": "b", "3": "tie", "ArrowDown": "tie" };
  document.addEventListener("keydown", function (e) {
    var t = e.target && e.target.tagName;
    if (t === "TEXTAREA" || t === "INPUT" || e.altKey || e.ctrlKey || e.metaKey) return;
    var c = keys[e.key];
    if (c && current) { e.preventDefault(); choose(c); }
  });

  load();
})();
