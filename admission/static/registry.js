// Refresh the registry in place: fetch a freshly rendered fragment and swap it in.
(function () {
  const root = document.getElementById("registry");
  if (!root) return;
  const every = parseInt(root.dataset.refreshMs || "5000", 10);
  async function refresh() {
    try {
      const resp = await fetch("/registry?partial=true", { credentials: "same-origin", cache: "no-store" });
      if (resp.status === 401) { window.location.assign("/registry/login"); return; }
      if (resp.ok) root.innerHTML = await resp.text();
    } catch (e) { /* coordinator briefly unreachable: keep the last view */ }
    setTimeout(refresh, every);
  }
  setTimeout(refresh, every);
})();
