// Live tables: every element with data-refresh="URL" has its content replaced by what URL
// answers (a fragment rendered by the server), every few seconds while the page is visible.
"use strict";
(function () {
  const PERIOD_MS = 3000;
  const targets = Array.from(document.querySelectorAll("[data-refresh]"));
  if (!targets.length) return;

  async function refresh(target) {
    const response = await fetch(target.dataset.refresh, {
      credentials: "same-origin",
      headers: { Accept: "text/html" },
    });
    if (response.redirected || !response.ok) return false; // signed out, or the node is gone
    target.innerHTML = await response.text();
    target.dataset.refreshedAt = String(Date.now());
    return true;
  }

  let timer = null;
  async function tick() {
    timer = null;
    if (!document.hidden) {
      try {
        const results = await Promise.all(targets.map(refresh));
        if (results.some((ok) => !ok)) return; // stop polling; a reload shows why
      } catch (error) {
        // a network blip: try again at the next tick
      }
    }
    timer = window.setTimeout(tick, PERIOD_MS);
  }
  timer = window.setTimeout(tick, PERIOD_MS);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null) tick();
  });
})();
