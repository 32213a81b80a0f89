// The dashboard's live view: every few seconds, fetch this page's <main> again and put it in
// place when it changed (its digest, X-Digest, differs; the server renders it, nothing here
// builds markup). Paused while the tab is hidden, and for good once a form is sent.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || main.dataset.live !== "on") return;
  var busy = false, sent = false, last = main.dataset.digest;
  document.addEventListener("submit", function () { sent = true; }, true);
  function refresh() {
    if (busy || sent || document.hidden) return;
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    url.searchParams.delete("notice");
    busy = true;
    fetch(url, { credentials: "same-origin", redirect: "error", cache: "no-store" })
      .then(function (answer) {
        var digest = answer.headers.get("X-Digest");
        if (!answer.ok || digest === last) return null;
        return answer.text().then(function (html) { return [digest, html]; });
      })
      .then(function (got) {
        if (got === null || sent) return;
        last = got[0];
        main.innerHTML = got[1];
        main.dataset.digest = last;
      })
      .catch(function () { /* the daemon restarting: the next tick tries again */ })
      .then(function () { busy = false; });
  }
  window.setInterval(refresh, 2000);
})();
