// pixmarket's dashboard: a client of the node's HTTP API only. The token is kept in session
// storage and sent as a bearer token on every call; the page itself holds no data.
"use strict";

const TOKEN_KEY = "pixmarket.api.token";
// How often the open view is refreshed; one refresh is in flight at a time, and none runs while
// the tab is hidden.
const POLL_MS = 3000;
// How often a job being bought is polled, and for how many polls at most (20 minutes).
const JOB_POLL_MS = 500;
const JOB_POLL_LIMIT = 2400;
// Images kept in the gallery (each one is fetched once, with the token).
const GALLERY_SIZE = 6;
// Receipts shown (newest first) out of the last day's.
const RECEIPTS_SHOWN = 50;

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY);
let view = null;
let node = null;
let refreshing = false;
let timer = null;
const galleryUrls = new Map(); // job id -> object URL

// ---- talking to the API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// What a person can do about an error, in words.
function explain(status, code, message) {
  if (status === 0) {
    return "Cannot reach the node: is `pixmarket node --api ...` still running at this address? (" + message + ")";
  }
  if (status === 401) {
    return "The node did not accept this token. Copy it again from <data-dir>/api.token: the node writes a fresh one each time it starts.";
  }
  if (status === 403 && code === "insufficient_scope") {
    return "This token may not do that: " + message + ". Sign in with the cookie token from api.token, or a named token with that scope.";
  }
  if (status === 403 && code === "foreign_origin") {
    return "The node refused this page's origin: open the dashboard at the address the node prints (\"api on http://...\"). " + message;
  }
  if (status === 429) {
    return "Too many requests: " + message + ". The dashboard retries on its next refresh.";
  }
  if (status === 402) {
    return "Not enough credit with the providers: " + message + ". Ask a provider to record a deposit for this node's peer id, or lower the max cost.";
  }
  if (status === 503) {
    return "No provider can take this now: " + message;
  }
  return message || ("the node answered HTTP " + status);
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "network", String(e.message || e));
  }
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!r.ok) {
    const err = (json && json.error) || {};
    const msg = err.message || text.slice(0, 300);
    throw new ApiError(r.status, err.code || "", explain(r.status, err.code, msg));
  }
  return json;
}

// An image URL from the API (absolute, naming the node's address), fetched with the token from
// this origin: only its path is used, so the page works under 127.0.0.1 and localhost alike.
async function imageBlobUrl(url) {
  const path = new URL(url, location.href).pathname;
  let r;
  try {
    r = await fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "network", String(e.message || e));
  }
  if (!r.ok) {
    throw new ApiError(r.status, "", explain(r.status, "", "the image is no longer kept (HTTP " + r.status + ")"));
  }
  return URL.createObjectURL(await r.blob());
}

function showError(e) {
  const box = $("error");
  if (!e) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = e instanceof ApiError ? e.message : String(e);
  box.hidden = false;
}

// ---- small DOM helpers ---------------------------------------------------------------------

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fillTable(id, rows, emptyText) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", emptyText, "empty");
    td.colSpan = $(id).tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) {
      tr.append(c instanceof Node ? wrapTd(c) : el("td", c));
    }
    body.append(tr);
  }
}

function wrapTd(child) {
  const td = el("td");
  td.append(child);
  return td;
}

const tok = (a) => (a ? a.tokens + " tok" : "–");
const shortPeer = (p) => (p && p.length > 20 ? p.slice(0, 10) + "…" + p.slice(-6) : p || "–");
const ms = (x) => (x === null || x === undefined ? "–" : x < 10 ? x.toFixed(2) + " ms" : x.toFixed(0) + " ms");

function mono(text, title) {
  const c = el("code", text);
  if (title) c.title = title;
  return c;
}

// ---- sign-in -------------------------------------------------------------------------------

async function signIn(candidate) {
  token = candidate;
  try {
    node = await api("GET", "/api/v1/node");
  } catch (e) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showSignedOut();
    showError(e);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  showError(null);
  $("signin").hidden = true;
  $("tabs").hidden = false;
  $("sign-out").hidden = false;
  $("whoami").textContent = "node " + node.peer_id;
  show(node.providing ? "provider" : "buyer");
}

function showSignedOut() {
  clearTimeout(timer);
  $("signin").hidden = false;
  $("tabs").hidden = true;
  $("sign-out").hidden = true;
  $("provider").hidden = true;
  $("buyer").hidden = true;
  $("whoami").textContent = "";
  view = null;
}

function signOut() {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const u of galleryUrls.values()) URL.revokeObjectURL(u);
  galleryUrls.clear();
  showError(null);
  showSignedOut();
}

function show(which) {
  view = which;
  $("provider").hidden = which !== "provider";
  $("buyer").hidden = which !== "buyer";
  $("tab-provider").classList.toggle("active", which === "provider");
  $("tab-buyer").classList.toggle("active", which === "buyer");
  refresh();
}

// ---- refreshing the open view --------------------------------------------------------------

async function refresh() {
  clearTimeout(timer);
  if (!token || !view) return;
  if (!refreshing && !document.hidden) {
    refreshing = true;
    try {
      if (view === "provider") await refreshProvider();
      else await refreshBuyer();
      showError(null);
    } catch (e) {
      showError(e);
      if (e.status === 401) {
        // The node restarted (new token) or the token was wrong: back to sign-in.
        token = null;
        sessionStorage.removeItem(TOKEN_KEY);
        showSignedOut();
        showError(e);
        refreshing = false;
        return;
      }
    }
    refreshing = false;
  }
  timer = setTimeout(refresh, POLL_MS);
}

async function refreshProvider() {
  const [span, buckets] = $("p-span").value.split(",");
  const since = Date.now() - 24 * 3600 * 1000;
  const [n, act, earn, accounts, receipts, peers] = await Promise.all([
    api("GET", "/api/v1/node"),
    api("GET", "/api/v1/activity"),
    api("GET", "/api/v1/earnings?bucket_s=" + span + "&buckets=" + buckets),
    api("GET", "/api/v1/accounts"),
    api("GET", "/api/v1/receipts?since_ms=" + since),
    api("GET", "/api/v1/peers"),
  ]);
  node = n;
  $("p-earned").textContent = tok(n.earnings);
  $("p-spent").textContent = tok(n.spent);
  $("p-queue").textContent = String(act.queue);
  $("p-peers").textContent = String(n.connected_peers);
  $("p-providing").textContent = n.providing
    ? "This node sells on " + (n.devices.length ? n.devices.join(", ") : "its configured device") + "."
    : "This node does not sell (start it with --provide); the figures below are its purchases.";

  drawChart($("p-chart"), earn);

  const outcomes = Object.entries(act.jobs);
  fillTable("p-jobs", outcomes.map(([k, v]) => [k, v]), "no jobs yet");
  fillTable(
    "p-devices",
    act.devices.map((d) => [
      d.device,
      d.name || "–",
      d.up ? el("span", "serving", "ok") : el("span", "failed", "bad"),
      (100 * d.busy_fraction).toFixed(1) + " %",
      ms(d.mean_step_ms),
      ms(d.last_step_ms),
      d.steps,
    ]),
    n.providing ? "no device has started yet" : "this node does not provide"
  );

  const addrs = $("p-addrs");
  addrs.replaceChildren(...n.addresses.map((a) => wrapLi(mono(a))));
  if (n.addresses.length === 0) addrs.append(el("li", "not listening", "bad"));
  const reach = n.reachability || {};
  $("p-reach").textContent =
    "Connected to " + n.connected_peers + " peer(s). Reachability: " + (reach.verdict || "unknown") +
    (reach.advice ? ". " + reach.advice : ".");
  $("p-peerlist").replaceChildren(...peers.data.map((p) => wrapLi(mono(p))));

  $("p-default-credit").textContent = tok(accounts.default_credit);
  const rows = [];
  for (const [role, list] of Object.entries(accounts.accounts)) {
    for (const a of list) {
      rows.push([
        mono(shortPeer(a.peer), a.peer),
        role === "provider" ? "buys from us" : "sells to us",
        tok(a.deposits),
        tok(a.credit_limit),
        tok(a.charged),
        tok(a.held),
        a.available ? tok(a.available) : el("span", "overdrawn", "bad"),
      ]);
    }
  }
  fillTable("p-accounts", rows, "no counterparties yet");

  const recent = receipts.data.slice(-RECEIPTS_SHOWN).reverse();
  fillTable(
    "p-receipts",
    recent.map((r) => [
      new Date(r.issued_at_ms).toLocaleString(),
      r.role,
      mono(shortPeer(r.peer), r.peer),
      mono(r.job.slice(0, 12), r.job),
      tok(r.cost),
      r.refunded
        ? el("span", "credited back: " + r.refunded)
        : r.undelivered
          ? el("span", "undelivered: " + r.undelivered, "bad")
          : r.acked
            ? el("span", "acknowledged", "ok")
            : el("span", "awaiting ack"),
      el("span", "verified", "ok"),
    ]),
    "no receipts in the last day"
  );
}

function wrapLi(child) {
  const li = el("li");
  li.append(child);
  return li;
}

// Bars of earned (green) and spent (orange) per bucket, oldest on the left.
function drawChart(box, earn) {
  const NS = "http://www.w3.org/2000/svg";
  const n = earn.earned.length;
  const W = 800, H = 180, PAD = 28;
  const max = Math.max(1, ...earn.earned.map((a) => a.micro), ...earn.spent.map((a) => a.micro));
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "earned " + earn.earned_total.tokens + ", spent " + earn.spent_total.tokens);
  const slot = (W - PAD) / n;
  const bar = Math.max(1, slot / 2 - 1);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  add("line", { x1: PAD, y1: H - 16, x2: W, y2: H - 16, class: "axis" });
  for (let i = 0; i < n; i++) {
    const x = PAD + i * slot;
    for (const [series, cls, dx] of [[earn.earned, "earned", 0], [earn.spent, "spent", bar]]) {
      const v = series[i].micro;
      if (v === 0) continue;
      const h = ((H - 24) * v) / max;
      const r = add("rect", { x: x + dx, y: H - 16 - h, width: bar, height: h, class: cls });
      const t = document.createElementNS(NS, "title");
      t.textContent = cls + " " + series[i].tokens + " tok";
      r.append(t);
    }
  }
  add("text", { x: 0, y: 10 }, (max / 1e6).toFixed(6));
  add("text", { x: PAD, y: H - 2 }, new Date(earn.from_ms).toLocaleString());
  add("text", { x: W - 140, y: H - 2 }, "now");
  const legend = el("p", "earned " + earn.earned_total.tokens + " tok · spent " + earn.spent_total.tokens + " tok in this span", "note");
  box.replaceChildren(svg, legend);
}

async function refreshBuyer() {
  const [providers, jobs] = await Promise.all([
    api("GET", "/api/v1/providers"),
    api("GET", "/api/v1/jobs"),
  ]);
  fillTable(
    "b-providers",
    providers.data.map((p) => [
      mono(shortPeer(p.peer), p.peer),
      p.model,
      p.gpu,
      (p.price_factor_ppm / 1e6).toFixed(2) + "×",
      p.ms_per_standard_image,
      p.queue_depth + " / " + p.max_queue,
      p.max_size,
      p.failures === 0 ? el("span", "no recent failures", "ok") : el("span", p.failures + " recent failure(s)", "bad"),
    ]),
    "no provider adverts yet: the node learns them from its peers (is it connected? see the Provider tab)"
  );
  await drawGallery(jobs.data);
}

async function drawGallery(jobs) {
  const done = jobs
    .filter((j) => j.status === "completed" && j.images && j.images.length)
    .sort((a, b) => b.created_at - a.created_at)
    .slice(0, GALLERY_SIZE);
  const keep = new Set(done.map((j) => j.id));
  for (const [id, u] of galleryUrls) {
    if (!keep.has(id)) {
      URL.revokeObjectURL(u);
      galleryUrls.delete(id);
    }
  }
  const figures = [];
  for (const j of done) {
    if (!galleryUrls.has(j.id)) {
      try {
        galleryUrls.set(j.id, await imageBlobUrl(j.images[0].url));
      } catch (_) {
        continue; // expired: the job lists it but its images are gone
      }
    }
    const f = el("figure");
    const img = el("img");
    img.src = galleryUrls.get(j.id);
    img.alt = j.request.prompt;
    const q = j.request;
    const cap = el("figcaption");
    cap.append(
      el("div", q.prompt),
      el("div", q.size + ", " + q.num_inference_steps + " steps, seed " + q.seed + ", " + q.model, "note"),
      el("div", "cost " + tok(j.result.cost))
    );
    f.append(img, cap);
    figures.push(f);
  }
  const g = $("b-gallery");
  g.replaceChildren(...figures);
  if (figures.length === 0) g.append(el("p", "No images bought through this node yet (or they are no longer kept).", "note"));
}

// ---- forms ---------------------------------------------------------------------------------

async function submitForm(form, resultId, work) {
  const button = form.querySelector("button[type=submit]");
  const out = $(resultId);
  button.disabled = true;
  out.className = "result";
  out.textContent = "…";
  try {
    out.textContent = await work();
    out.className = "result ok";
    refresh();
  } catch (e) {
    out.textContent = e instanceof ApiError ? e.message : String(e);
    out.className = "result bad";
    if (e.status === 401) signOutWith(e);
  } finally {
    button.disabled = false;
  }
}

function signOutWith(e) {
  signOut();
  showError(e);
}

function deposit() {
  const peer = $("deposit-peer").value.trim();
  return api("POST", "/api/v1/accounts/" + encodeURIComponent(peer) + "/deposits", {
    tokens: $("deposit-tokens").value.trim(),
    memo: $("deposit-memo").value,
  }).then((r) => "Recorded " + r.amount.tokens + " tok: " + shortPeer(peer) + " now has " + tok(r.account.available) + " available.");
}

function creditLimit() {
  const peer = $("credit-peer").value.trim();
  return api("PUT", "/api/v1/accounts/" + encodeURIComponent(peer) + "/credit-limit", {
    tokens: $("credit-tokens").value.trim(),
  }).then((r) => "Credit limit of " + shortPeer(peer) + " is now " + tok(r.account.credit_limit) + ".");
}

// ---- buying --------------------------------------------------------------------------------

let currentJob = null;

async function generate(ev) {
  ev.preventDefault();
  const body = { prompt: $("g-prompt").value, size: $("g-size").value };
  const neg = $("g-negative").value.trim();
  if (neg) body.negative_prompt = neg;
  const steps = $("g-steps").value.trim();
  if (steps) body.num_inference_steps = Number(steps);
  const seed = $("g-seed").value.trim();
  if (seed) body.seed = Number(seed);
  const max = $("g-max-cost").value.trim();
  if (max) body.max_cost = max;
  // Free, small previews decoded from the latents while the job runs (at most 3).
  body.partial_images = 3;
  $("g-submit").disabled = true;
  $("j-figure").hidden = true;
  $("j-progress-box").hidden = true;
  $("j-preview").hidden = true;
  $("j-status").className = "";
  $("j-status").textContent = "Submitting…";
  try {
    const job = await api("POST", "/api/v1/jobs", body);
    currentJob = { id: job.id, quote: null };
    $("j-cancel").hidden = false;
    await followJob(job);
  } catch (e) {
    $("j-status").textContent = e instanceof ApiError ? e.message : String(e);
    $("j-status").className = "bad";
    if (e.status === 401) signOutWith(e);
  } finally {
    $("g-submit").disabled = false;
    $("j-cancel").hidden = true;
  }
}

async function followJob(job) {
  for (let polls = 0; polls < JOB_POLL_LIMIT; polls++) {
    if (showJob(job)) return;
    await new Promise((r) => setTimeout(r, JOB_POLL_MS));
    if (!currentJob || currentJob.id !== job.id) return;
    job = await api("GET", "/api/v1/jobs/" + job.id);
  }
  $("j-status").textContent = "Still not finished after " + (JOB_POLL_LIMIT * JOB_POLL_MS) / 60000 + " minutes; it stays listed under Last images if it completes.";
}

// Shows where the job stands; true once it is finished.
function showJob(j) {
  const status = $("j-status");
  status.className = "";
  if (j.quoted_cost) currentJob.quote = j.quoted_cost;
  const quote = currentJob.quote ? " Quoted " + tok(currentJob.quote) + "." : "";
  switch (j.status) {
    case "queued":
      if (j.queue === "provider" && j.queue_position !== undefined) {
        status.textContent = "In " + shortPeer(j.provider) + "'s queue at position " + j.queue_position +
          (j.eta_ms ? ", about " + (j.eta_ms / 1000).toFixed(1) + " s to go." : ".") + quote;
      } else if (j.queue === "provider") {
        status.textContent = "Asking " + shortPeer(j.provider) + " for a quote…" + quote;
      } else {
        status.textContent = "Waiting in this node's queue" + (j.queue_position !== null && j.queue_position !== undefined ? " at position " + j.queue_position : "") + "." + quote;
      }
      return false;
    case "running":
      $("j-progress-box").hidden = false;
      $("j-progress").max = j.steps || 1;
      $("j-progress").value = j.step || 0;
      $("j-step").textContent = "step " + j.step + " of " + j.steps;
      if (j.preview) {
        $("j-preview").src = "data:image/png;base64," + j.preview.b64_png;
        $("j-preview").title = "preview at step " + j.preview.step + " of " + j.preview.steps;
        $("j-preview").hidden = false;
      }
      status.textContent = "Running on " + shortPeer(j.provider) + "." + quote;
      return false;
    case "completed":
      $("j-progress-box").hidden = true;
      $("j-preview").hidden = true;
      status.textContent = "Done.";
      showResult(j);
      return true;
    case "failed":
      status.textContent = "Failed: " + explain(failStatus(j.error.code), j.error.code, j.error.message);
      status.className = "bad";
      return true;
    default:
      status.textContent = "Cancelled: nothing was acknowledged, so nothing is paid.";
      return true;
  }
}

function failStatus(code) {
  return { insufficient_credit: 402, no_providers: 503, market_busy: 429 }[code] || 400;
}

async function showResult(j) {
  $("j-cost").textContent = tok(j.result.cost);
  $("j-provider").textContent = j.result.provider;
  $("j-receipt").textContent = j.result.receipt;
  $("j-seed").textContent = String(j.result.seed);
  try {
    const u = await imageBlobUrl(j.images[0].url);
    const img = $("j-image");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = u;
    img.alt = j.request.prompt;
    $("j-figure").hidden = false;
  } catch (e) {
    showError(e);
  }
  refresh();
}

async function cancelJob() {
  if (!currentJob) return;
  const id = currentJob.id;
  try {
    const j = await api("POST", "/api/v1/jobs/" + id + "/cancel");
    showJob(j);
  } catch (e) {
    showError(e);
  }
}

// ---- wiring --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("token").value.trim());
    $("token").value = "";
  });
  $("sign-out").addEventListener("click", signOut);
  $("tab-provider").addEventListener("click", () => show("provider"));
  $("tab-buyer").addEventListener("click", () => show("buyer"));
  $("p-span").addEventListener("change", refresh);
  $("deposit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    submitForm(ev.target, "deposit-result", deposit);
  });
  $("credit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    submitForm(ev.target, "credit-result", creditLimit);
  });
  $("generate-form").addEventListener("submit", generate);
  $("j-cancel").addEventListener("click", cancelJob);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  if (token) signIn(token);
  else showSignedOut();
});
