// The console's only script: refreshes the sections every two seconds and
// sends the redrive actions (after a confirmation) with the operator token.
(function () {
  "use strict";
  var base = document.body.dataset.base;
  var content = document.getElementById("content");
  var status = document.getElementById("status");
  var updated = document.getElementById("updated");
  var token = document.getElementById("token");
  if (token) {
    token.value = sessionStorage.getItem("switchboard-console-token") || "";
    token.addEventListener("input", function () {
      sessionStorage.setItem("switchboard-console-token", token.value);
    });
  }
  function say(text, bad) {
    status.textContent = text;
    status.className = bad ? "bad" : "good";
  }
  function refresh() {
    return fetch(base + "/fragment", { cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("the console answered " + response.status); }
        return response.text();
      })
      .then(function (html) {
        content.innerHTML = html;
        updated.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (error) { updated.textContent = "cannot refresh: " + error.message; });
  }
  setInterval(refresh, 2000);
  content.addEventListener("click", function (event) {
    var button = event.target.closest("button.redrive, button.redrive-all");
    if (!button) { return; }
    var topic = button.dataset.topic;
    var id = button.dataset.id;
    var all = button.classList.contains("redrive-all");
    var question = all
      ? "Redrive every dead letter of " + topic + "?"
      : "Redrive dead letter " + id + " of " + topic + "?";
    if (!window.confirm(question)) { return; }
    var url = base + "/api/dead-letters/" + encodeURIComponent(topic) +
      (all ? "/redrive-all" : "/" + encodeURIComponent(id) + "/redrive");
    button.disabled = true;
    fetch(url, { method: "POST", headers: { "Authorization": "Bearer " + (token ? token.value : "") } })
      .then(function (response) {
        return response.json().then(function (body) { return { ok: response.ok, body: body }; });
      })
      .then(function (answer) {
        if (answer.ok) { say("redriven: " + answer.body.redriven, false); }
        else { say(answer.body.error, true); }
        return refresh();
      })
      .catch(function (error) { say(error.message, true); });
  });
})();
