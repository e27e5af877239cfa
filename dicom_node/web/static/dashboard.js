// dicom-node dashboard: refresh without reloading, filters, retry/cancel.
// Plain browser JavaScript, no libraries (the node ships everything; no CDN).
// Data is inserted with textContent only, never as HTML.
(function () {
  "use strict";

  const refreshMs = 1000 * (Number(document.body.dataset.refreshSeconds) || 5);
  const live = document.getElementById("live");

  function setLive(ok) {
    if (!live) return;
    live.classList.toggle("stale", !ok);
    live.textContent = ok ? "live" : "offline";
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  // Same format as the server's "when" filter: YYYY-MM-DD HH:MM:SS in UTC.
  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d.getTime())) return iso;
    return d.toISOString().slice(0, 19).replace("T", " ");
  }

  function seconds(value) {
    if (typeof value !== "number") return "";
    return value < 10 ? value.toFixed(2) : value.toFixed(1);
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  // -- job list -------------------------------------------------------------------------------

  const filters = document.getElementById("filters");
  const table = document.getElementById("jobs");

  function apiQuery(form) {
    const data = new FormData(form);
    const params = new URLSearchParams();
    if (data.get("state")) params.set("state", data.get("state"));
    if (data.get("model")) params.set("model", data.get("model"));
    if (data.get("from")) params.set("since", data.get("from") + "T00:00:00Z");
    if (data.get("to")) {
      const end = new Date(data.get("to") + "T00:00:00Z");
      end.setUTCDate(end.getUTCDate() + 1);
      params.set("until", end.toISOString());
    }
    params.set("limit", "100");
    return params;
  }

  function pageQuery(form) {
    const params = new URLSearchParams();
    for (const [key, value] of new FormData(form)) if (value) params.set(key, value);
    return params;
  }

  function jobRow(job) {
    const timings = el("td", { className: "timings" });
    for (const [stage, secs] of Object.entries(job.timings || {})) {
      timings.append(el("span", { text: stage + " " + seconds(secs) }));
    }
    const delivery = el("td", { className: "deliveries" });
    const deliveries = Object.entries(job.deliveries || {});
    if (deliveries.length === 0) delivery.append(el("span", { className: "muted", text: "none" }));
    for (const [destination, state] of deliveries) {
      delivery.append(el("span", { className: "delivery delivery-" + state, text: destination + " " + state }));
    }
    const model = el("td", { text: job.model });
    if (job.model_version) model.append(" ", el("span", { className: "version", text: job.model_version }));
    const reason = job.reason || "";
    const state = el("td", {}, [el("span", { className: "state state-" + job.state, text: job.state })]);
    if (job.priority && job.priority !== "routine") {
      state.append(" ", el("span", { className: "priority priority-" + job.priority, text: job.priority }));
    }
    return el("tr", { "data-job-id": job.id, "data-state": job.state }, [
      state,
      el("td", {}, [el("a", { href: "/jobs/" + encodeURIComponent(job.id) }, [el("code", { text: job.id.slice(0, 8) })])]),
      el("td", {}, [
        el("code", { text: job.study.key.slice(0, 12) }),
        " v" + job.study.version + " · " + job.study.instances + " inst.",
      ]),
      model,
      el("td", { text: when(job.created_at) }),
      timings,
      el("td", { className: "num", text: job.findings === null || job.findings === undefined ? "" : String(job.findings) }),
      delivery,
      el("td", { className: "error", title: reason, text: reason.slice(0, 120) }),
    ]);
  }

  let listRequest = 0;

  // Models that appear after the page was rendered become choosable in the filter.
  function addModelOptions(models) {
    const select = filters.querySelector('select[name="model"]');
    if (!select) return;
    const known = new Set(Array.from(select.options, (o) => o.value));
    for (const model of models) {
      if (!model || model === "-" || known.has(model)) continue;
      select.append(el("option", { value: model, text: model }));
      known.add(model);
    }
  }

  async function refreshList() {
    // A slow answer for an older filter must not overwrite a newer one.
    const mine = ++listRequest;
    try {
      const [data, studies] = await Promise.all([
        getJSON("/api/jobs?" + apiQuery(filters).toString()),
        getJSON("/api/studies"),
      ]);
      if (mine !== listRequest) return;
      const body = table.tBodies[0];
      const rows = data.jobs.map(jobRow);
      if (rows.length === 0) {
        rows.push(el("tr", { className: "empty" }, [el("td", { colspan: "9", text: "No jobs match." })]));
      }
      body.replaceChildren(...rows);
      document.getElementById("job-count").textContent = String(data.count);
      addModelOptions(data.jobs.map((job) => job.model));
      const panel = document.getElementById("receiving");
      const list = document.getElementById("receiving-list");
      list.replaceChildren(
        ...studies.receiving.map((st) =>
          el("li", {}, [el("code", { text: st.key.slice(0, 12) }), " " + st.instances + " instance(s), last at " + when(st.last_received_at)]),
        ),
      );
      panel.hidden = studies.receiving.length === 0;
      setLive(true);
    } catch (err) {
      setLive(false);
    }
  }

  if (filters && table) {
    filters.addEventListener("submit", (event) => {
      event.preventDefault();
      const query = pageQuery(filters).toString();
      history.replaceState(null, "", query ? "/?" + query : "/");
      refreshList();
    });
    filters.addEventListener("change", () => filters.requestSubmit());
    setInterval(refreshList, refreshMs);
  }

  // -- job page -------------------------------------------------------------------------------

  async function refreshJob(force) {
    const holder = document.getElementById("job");
    if (!holder) return;
    try {
      const job = await getJSON("/api/jobs/" + encodeURIComponent(holder.dataset.jobId));
      setLive(true);
      if (!force && job.updated_at === holder.dataset.updated && job.state === holder.dataset.state) return;
      const response = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("main");
      if (fresh) {
        document.getElementById("main").replaceChildren(...fresh.childNodes);
        bindActions();
      }
    } catch (err) {
      setLive(false);
    }
  }

  function bindActions() {
    for (const form of document.querySelectorAll(".actions form")) {
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const response = await fetch(form.action, {
          method: "POST",
          credentials: "same-origin",
          headers: { Accept: "application/json" },
        });
        if (!response.ok) {
          const detail = await response.json().catch(() => ({}));
          window.alert(detail.detail || "The action could not be applied (HTTP " + response.status + ").");
        }
        refreshJob(true);
      });
    }
  }

  if (document.getElementById("job")) {
    bindActions();
    setInterval(() => refreshJob(false), refreshMs);
  }
})();
