// Keeps the status page live: fetches the server-rendered live part every few seconds and
// swaps it in, and copies postcards. Everything shown also works without this script.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var state = document.getElementById("state");
  var ms = parseInt(live.getAttribute("data-poll-ms"), 10) || 2000;

  function refresh() {
    fetch("/status.fragment", { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        // Keep a selection in a postcard box from being wiped while someone copies by hand.
        var sel = window.getSelection && window.getSelection().toString();
        if (!sel) live.innerHTML = html;
        state.textContent = "live";
        state.className = "state";
      })
      .catch(function () {
        state.textContent = "router unreachable";
        state.className = "state bad";
      })
      .then(function () { setTimeout(refresh, ms); });
  }

  function copy(text, button) {
    var done = function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
    } else {
      fallback(text);
      done();
    }
  }

  // Plain http:// on a LAN address is not a secure context: no clipboard API there.
  function fallback(text) {
    var t = document.createElement("textarea");
    t.value = text;
    t.setAttribute("readonly", "");
    t.style.position = "fixed";
    t.style.opacity = "0";
    document.body.appendChild(t);
    t.select();
    try { document.execCommand("copy"); } catch (e) { /* the text stays selectable */ }
    document.body.removeChild(t);
  }

  live.addEventListener("click", function (ev) {
    var b = ev.target.closest && ev.target.closest("button.copy");
    if (b) copy(b.getAttribute("data-copy"), b);
  });

  setTimeout(refresh, ms);
})();
