// svllm operators' console: plain JS, no build step. Every call to the router carries the
// admin token the operator entered (kept in sessionStorage, so it ends with the tab).
"use strict";

const TOKEN_KEY = "svllm.adminToken";
const REFRESH_MS = 2000;
// Usage sums many hours of counters: read less often than the pool's state.
const USAGE_REFRESH_MS = 10000;
const LOG_LINES_KEPT = 400;

// ---------------------------------------------------------------- helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  const t = token();
  if (t) headers.authorization = "Bearer " + t;
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, {method, headers,
    body: body === undefined ? undefined : JSON.stringify(body)});
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON: the status says enough */ }
  if (!r.ok) {
    const msg = (data && data.error && data.error.message) || `HTTP ${r.status}`;
    if (r.status === 401 && path !== "/admin/status?login") signOut(msg);
    throw new ApiError(msg, r.status);
  }
  return data;
}

function secs(v) { return v === null || v === undefined ? "–" : `${Number(v).toFixed(2)} s`; }

function stateBadge(s) { return h("span", {class: `state state-${s}`}, s || "?"); }

function serving(m) {
  const running = m.instances.filter((i) => i.state === "RUNNING").length;
  return `${running}/${m.spec.replicas}`;
}

function memBar(used, total, label) {
  const frac = total > 0 ? Math.min(1, used / total) : 0;
  const cls = frac > 0.9 ? "bar full" : frac > 0.7 ? "bar high" : "bar";
  return h("span", {class: cls, role: "meter", "aria-label": label, "aria-valuemin": "0",
    "aria-valuemax": String(total), "aria-valuenow": String(used),
    "aria-valuetext": `${used} of ${total} MB used`},
  h("span", {style: `width:${(frac * 100).toFixed(1)}%`}));
}

// Replace a region's content only when its data changed, so keyboard focus inside it is
// not lost to a refresh that brought nothing new.
function update(region, data, build) {
  const sig = JSON.stringify(data);
  if (region.dataset.sig === sig) return;
  region.dataset.sig = sig;
  region.replaceChildren(...[build(data)].flat());
}

function table(caption, columns, rows) {
  return h("div", {class: "scroll"}, h("table", {},
    h("caption", {class: "notice", style: "text-align:left"}, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {scope: "col"}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))))));
}

function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true});
    dialog.returnValue = "cancel";
    dialog.showModal();
    document.getElementById("confirm-ok").focus();
  });
}

// ---------------------------------------------------------------- sign in / out
function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("login-error").textContent = message || "";
  route();
}

async function signIn(ev) {
  ev.preventDefault();
  const value = document.getElementById("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    await api("GET", "/admin/status?login");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById("login-error").textContent = `Sign-in failed: ${e.message}`;
    return;
  }
  document.getElementById("login-error").textContent = "";
  document.getElementById("token").value = "";
  route();
}

// ---------------------------------------------------------------- views
let timer = null;
let current = null;  // the view's refresh function

function workersRegion(workers) {
  const rows = workers.map((w) => [
    w.worker_id,
    w.alive ? "alive" : h("span", {class: "state state-FAILED"}, "dead"),
    (w.engines || []).join(", "),
    w.gpus && w.gpus.length ? w.gpus.map((g) => h("div", {},
      `GPU ${g.index} `, memBar(g.memory_used_mb, g.memory_total_mb,
        `${w.worker_id} GPU ${g.index} memory`),
      ` ${g.memory_used_mb}/${g.memory_total_mb} MB used, ` +
      `${(w.gpu_reserved_mb || {})[String(g.index)] || 0} reserved, ${g.memory_free_mb} free`))
      : h("span", {class: "notice"}, w.gpu_message || "no GPU"),
  ]);
  return table(`${workers.length} worker(s)`, ["Worker", "Status", "Engines", "GPU memory"],
    rows);
}

function modelsRegion(models) {
  if (!models.length) return h("p", {class: "notice"}, "No models registered yet.");
  const rows = models.map((m) => [
    h("a", {href: `#/model/${encodeURIComponent(m.alias)}`}, m.alias),
    stateBadge(m.state), serving(m), String(m.waiting_requests), m.engine,
    secs(m.stats.last_cold_start_s), m.model_name,
  ]);
  return table(`${models.length} model(s)`, ["Model", "State", "Serving/wanted",
    "Held requests", "Engine", "Last cold start", "Model name"], rows);
}

function overview(view) {
  const summary = h("p", {class: "summary", "aria-live": "polite"});
  const workers = h("div");
  const models = h("div");
  const error = h("p", {class: "error", role: "alert"});
  view.append(
    h("section", {"aria-labelledby": "pool-title"}, h("h2", {id: "pool-title"}, "Pool"),
      summary, error),
    h("section", {"aria-labelledby": "models-title"}, h("h2", {id: "models-title"}, "Models"),
      models),
    h("section", {"aria-labelledby": "workers-title"},
      h("h2", {id: "workers-title"}, "Workers"), workers));
  return async () => {
    let s;
    try { s = await api("GET", "/admin/status"); error.textContent = ""; } catch (e) {
      error.textContent = e.message; return;
    }
    const held = s.models.reduce((n, m) => n + m.waiting_requests, 0);
    const alive = s.workers.filter((w) => w.alive).length;
    update(summary, [alive, s.workers.length, s.models.length, held, s.scheduler.lease],
      () => [h("span", {}, `Workers alive: ${alive}/${s.workers.length}`),
        h("span", {}, `Models: ${s.models.length}`), h("span", {}, `Held requests: ${held}`),
        h("span", {}, `Scheduler: ${s.scheduler.lease || "no leader"}`)]);
    update(models, s.models, modelsRegion);
    update(workers, s.workers, workersRegion);
  };
}

function instancesRegion(instances) {
  if (!instances.length) return h("p", {class: "notice"}, "No instance (nothing running).");
  // An engine on a Unix socket (the worker's default) has port 0: say where it is instead.
  return table(`${instances.length} instance(s)`, ["Worker", "State", "Engine on", "PID",
    "GPUs", "Warm-up", "In flight", "Note"], instances.map((i) => [i.worker_id,
    stateBadge(i.state), i.socket ? "unix socket" : `port ${i.port}`, i.pid, i.gpus || "–",
    secs(i.warmup_s), i.inflight, i.note || ""]));
}

function timingsRegion(stats) {
  const kv = [["Cold starts", stats.cold_starts], ["Last cold start", secs(stats.last_cold_start_s)],
    ["Median cold start", secs(stats.median_cold_start_s)], ["Wakes", stats.wakes],
    ["Last wake", secs(stats.last_wake_s)], ["Median wake", secs(stats.median_wake_s)],
    ["Requests that waited", stats.waited_requests], ["Total wait", secs(stats.wait_total_s)]];
  return h("dl", {class: "kv"}, kv.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
}

function errorsRegion(m) {
  const items = [];
  if (m.placement) items.push(`Placement: ${m.placement}`);
  for (const i of m.instances) {
    if (i.error) items.push(`${i.worker_id}: ${i.error}`);
  }
  if (!items.length) return h("p", {class: "notice"}, "No recent errors.");
  return h("ul", {}, items.map((t) => h("li", {class: "error"}, t)));
}

function specRegion(spec) {
  return h("dl", {class: "kv"}, Object.entries(spec).map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, v === null ? "–" : JSON.stringify(v))]));
}

function modelPage(view, alias) {
  const head = h("p", {class: "summary", "aria-live": "polite"});
  const message = h("p", {class: "error", role: "alert"});
  const act = (label, path, method, question) => h("button", {type: "button",
    class: method === "DELETE" ? "danger" : null, onclick: async () => {
      if (!await confirmAction(question)) return;
      try {
        await api(method, path);
        message.textContent = "";
        status.textContent = `${label}: requested.`;
        if (method === "DELETE") { location.hash = "#/"; return; }
        refresh();
      } catch (e) { message.textContent = `${label} failed: ${e.message}`; }
    }}, label);
  const base = `/admin/models/${encodeURIComponent(alias)}`;
  const status = h("p", {class: "notice", role: "status"});
  const instances = h("div"); const timings = h("div"); const errors = h("div");
  const spec = h("div");
  const log = h("pre", {class: "log", tabindex: "0", role: "log",
    "aria-label": "Engine log tail"});
  const logNote = h("p", {class: "notice"});
  view.append(
    h("section", {"aria-labelledby": "model-title"},
      h("h2", {id: "model-title"}, `Model ${alias}`), head,
      act("Wake", `${base}/wake`, "POST", `Start or wake ${alias} now?`),
      act("Sleep", `${base}/sleep`, "POST", `Put ${alias}'s engines to sleep?`),
      act("Stop", `${base}/stop`, "POST",
        `Stop every instance of ${alias}? Requests get 503 until it is woken.`),
      act("Delete", base, "DELETE", `Delete ${alias}? Its instances stop.`), status, message),
    h("section", {"aria-labelledby": "inst-title"}, h("h2", {id: "inst-title"}, "Instances"),
      instances),
    h("section", {"aria-labelledby": "err-title"}, h("h2", {id: "err-title"}, "Recent errors"),
      errors),
    h("section", {"aria-labelledby": "time-title"},
      h("h2", {id: "time-title"}, "Cold-start and wake timings"), timings),
    h("section", {"aria-labelledby": "log-title"}, h("h2", {id: "log-title"}, "Engine log"),
      logNote, log),
    h("section", {"aria-labelledby": "spec-title"}, h("h2", {id: "spec-title"}, "Spec"), spec));
  let logPos = null;  // {worker, offset} of the tail being followed

  async function readLog(m) {
    const worker = (m.instances.find((i) => i.state === "RUNNING") || m.instances[0] || {})
      .worker_id;
    if (!worker) { logNote.textContent = "No instance: no engine log to show."; return; }
    const follow = logPos && logPos.worker === worker;
    const q = follow ? `worker=${encodeURIComponent(worker)}&since=${logPos.offset}`
      : `worker=${encodeURIComponent(worker)}&lines=100`;
    const r = await api("GET", `${base}/log?${q}`);
    const lines = ((follow ? log.textContent : "") + r.text).split("\n");
    log.textContent = lines.slice(-LOG_LINES_KEPT).join("\n");
    if (r.text) log.scrollTop = log.scrollHeight;
    logNote.textContent = `Engine log of ${alias} on ${worker} (last lines, live).`;
    logPos = {worker, offset: r.offset};
  }

  async function refresh() {
    let m;
    try {
      m = (await api("GET", "/admin/models")).models.find((x) => x.alias === alias);
    } catch (e) { message.textContent = e.message; return; }
    if (!m) { message.textContent = `Model '${alias}' is not registered.`; return; }
    update(head, [m.state, serving(m), m.waiting_requests, m.engine, m.model_name], () => [
      h("span", {}, "State: ", stateBadge(m.state)), h("span", {}, `Serving: ${serving(m)}`),
      h("span", {}, `Held requests: ${m.waiting_requests}`),
      h("span", {}, `${m.engine}: ${m.model_name}`)]);
    update(instances, m.instances.map((i) => [i.worker_id, i.state, i.port, i.socket, i.pid, i.gpus,
      i.warmup_s, i.inflight, i.note]), () => instancesRegion(m.instances));
    update(errors, [m.placement, m.instances.map((i) => i.error)], () => errorsRegion(m));
    update(timings, m.stats, timingsRegion);
    update(spec, m.spec, specRegion);
    try { await readLog(m); } catch (e) { logNote.textContent = `Log: ${e.message}`; }
  }
  return refresh;
}

const ENGINES = ["", "vllm", "sim", "llamacpp", "sglang"];

function registerPage(view) {
  const field = (id, label, attrs, help) => [h("label", {for: id}, label),
    h("input", Object.assign({id, name: id}, attrs)),
    help ? h("p", {class: "help", id: `${id}-help`}, help) : null];
  const error = h("p", {class: "error", role: "alert", id: "register-error"});
  const form = h("form", {"aria-labelledby": "reg-title", novalidate: true},
    field("alias", "Alias", {required: true, "aria-describedby": "alias-help"},
      "The name clients put in \"model\": letters, digits, . _ -"),
    field("model_name", "Model name", {required: true, "aria-describedby": "model_name-help"},
      "A hub id (org/name) or a local path."),
    h("label", {for: "engine"}, "Engine"),
    h("select", {id: "engine", name: "engine"}, ENGINES.map((e) =>
      h("option", {value: e}, e || "default (the router's DEFAULT_ENGINE)"))),
    field("replicas", "Replicas", {type: "number", min: "1", value: "1"}),
    field("min_replicas", "Minimum replicas when idle", {type: "number", min: "0", value: "1",
      "aria-describedby": "min_replicas-help"}, "0 scales to zero: nothing runs until a request."),
    h("label", {for: "more"}, "Other fields (JSON object)"),
    h("textarea", {id: "more", name: "more", "aria-describedby": "more-help",
      placeholder: "{\"idle_sleep_s\": 300, \"extra_args\": [\"--enable-prefix-caching\"]}"}),
    h("p", {class: "help", id: "more-help"},
      "Any other field of POST /admin/models/register, e.g. max_model_len, idle_stop_s."),
    h("button", {type: "submit", class: "primary"}, "Register"), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const v = (id) => form.querySelector(`#${id}`).value.trim();
    let body;
    try { body = v("more") ? JSON.parse(v("more")) : {}; } catch (e) {
      error.textContent = `Other fields: not valid JSON (${e.message})`; return;
    }
    body = Object.assign({alias: v("alias"), model_name: v("model_name"),
      replicas: Number(v("replicas")), min_replicas: Number(v("min_replicas"))}, body);
    if (v("engine")) body.engine = v("engine");
    try {
      await api("POST", "/admin/models/register", body);
    } catch (e) { error.textContent = e.message; return; }
    location.hash = `#/model/${encodeURIComponent(body.alias)}`;
  });
  view.append(h("section", {"aria-labelledby": "reg-title"},
    h("h2", {id: "reg-title"}, "Register a model"), form));
  return null;
}

function playground(view) {
  const select = h("select", {id: "pg-model", name: "model"});
  const prompt = h("textarea", {id: "pg-prompt", name: "prompt"}, "Hello! Who are you?");
  const out = h("div", {class: "output", id: "pg-output", role: "log", "aria-live": "polite",
    "aria-label": "Answer"});
  const status = h("p", {class: "notice", role: "status"});
  const send = h("button", {type: "submit", class: "primary"}, "Send");
  const form = h("form", {},
    h("label", {for: "pg-model"}, "Model"), select,
    h("label", {for: "pg-prompt"}, "Message"), prompt, send, status,
    h("h3", {}, "Answer"), out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.textContent = "";
    send.disabled = true;
    try { await streamChat(select.value, prompt.value, out, status); } catch (e) {
      status.textContent = `Error: ${e.message}`;
    } finally { send.disabled = false; }
  });
  view.append(h("section", {"aria-labelledby": "pg-title"},
    h("h2", {id: "pg-title"}, "Playground: streamed chat"), form));
  api("GET", "/admin/models").then((r) => {
    select.replaceChildren(...r.models.map((m) => h("option", {value: m.alias}, m.alias)));
  }).catch((e) => { status.textContent = e.message; });
  return null;
}

async function streamChat(model, text, out, status) {
  const headers = {"content-type": "application/json"};
  if (token()) headers.authorization = "Bearer " + token();
  status.textContent = "Sending…";
  const r = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(
    {model, stream: true, messages: [{role: "user", content: text}]})});
  if (!r.ok) {
    let msg = `HTTP ${r.status}`;
    try { msg = (await r.json()).error.message; } catch (_) { /* keep the status */ }
    throw new Error(msg);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let tokens = 0;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith(":")) { status.textContent = "Waiting for the model to start…"; }
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          out.textContent += delta.content;
          tokens += 1;
          status.textContent = `Streaming… ${tokens} chunk(s)`;
        }
      }
    }
  }
  status.textContent = `Done: ${tokens} chunk(s).`;
}

// ---------------------------------------------------------------- API keys
const PRIORITIES = ["normal", "high", "low"];
const LIMIT_FIELDS = [["rpm", "Requests per minute"], ["tpm", "Tokens per minute"],
  ["max_concurrent", "Requests at once"]];

function num(n) { return Number(n).toLocaleString("en-US"); }

function utcDate(ts) { return new Date(ts * 1000).toISOString().slice(0, 10); }

function limitsText(k) {
  const parts = [];
  if (k.rpm) parts.push(`${num(k.rpm)} req/min`);
  if (k.tpm) parts.push(`${num(k.tpm)} tokens/min`);
  if (k.max_concurrent) parts.push(`${num(k.max_concurrent)} at once`);
  for (const [glob, l] of Object.entries(k.model_limits || {})) {
    const each = [l.rpm ? `${num(l.rpm)} req/min` : null,
      l.tpm ? `${num(l.tpm)} tokens/min` : null].filter(Boolean).join(", ");
    parts.push(`${glob}: ${each}`);
  }
  return parts.length ? parts.join("; ") : "none";
}

// The fields of a key's form, for a new key (key undefined) or an edit of `key`. Empty
// number fields mean "no limit"; the API validates everything and its message is shown.
function keyFields(prefix, key) {
  const k = key || {};
  const field = (id, label, attrs, help) => [h("label", {for: `${prefix}-${id}`}, label),
    h("input", Object.assign({id: `${prefix}-${id}`, name: id}, attrs,
      help ? {"aria-describedby": `${prefix}-${id}-help`} : {})),
    help ? h("p", {class: "help", id: `${prefix}-${id}-help`}, help) : null];
  const limit = ([id, label]) => field(id, label, {type: "number", min: "1", step: "1",
    value: k[id] ? String(k[id]) : ""});
  return [
    field("name", "Name", {required: true, value: k.name || ""},
      "Who or what uses the key: letters, digits, . _ -"),
    key ? h("p", {}, `Tenant: ${k.tenant}`) : field("tenant", "Tenant", {value: "default"},
      "Keys of one tenant share its limits and its usage rows."),
    field("models", "Models", {value: (k.models || ["*"]).join(", ")},
      "Comma-separated aliases or globs the key may use, e.g. llama-*, qwen; * is all."),
    LIMIT_FIELDS.map(limit),
    h("p", {class: "help"}, "An empty limit is no limit."),
    h("label", {for: `${prefix}-priority`}, "Priority"),
    h("select", {id: `${prefix}-priority`, name: "priority"}, PRIORITIES.map((p) =>
      h("option", {value: p, selected: (k.priority || "normal") === p}, p))),
    // data-initial: an edit sends the expiry only when this field changed (the date
    // would move an exact expiry to the end of its day, or revive a key expired today).
    field("expires", "Expires after (UTC date)", {type: "date",
      min: utcDate(Date.now() / 1000), value: k.expires_at ? utcDate(k.expires_at) : "",
      "data-initial": k.expires_at ? utcDate(k.expires_at) : ""},
    "The key stops working at the end of this day. Empty: it never expires."),
  ];
}

// A number field's value: "" when empty; an error when it holds something that is not a
// number (the browser then reports its value as "", which would read as "no limit").
function numberOf(el, label) {
  if (el.validity.badInput) throw new Error(`${label}: not a whole number`);
  return el.value.trim();
}

// The body of POST /admin/keys (create) or PATCH /admin/keys/{id} (edit: an empty field
// removes that limit, so it is sent as null). Throws on a field that is not a number.
function keyBody(form, prefix, edit) {
  const el = (id) => form.querySelector(`#${prefix}-${id}`);
  const v = (id) => (el(id) ? el(id).value.trim() : "");
  const body = {name: v("name"), priority: v("priority"),
    models: v("models").split(",").map((m) => m.trim()).filter(Boolean)};
  if (!edit) body.tenant = v("tenant") || "default";
  for (const [id, label] of LIMIT_FIELDS) {
    const n = numberOf(el(id), label);
    if (n) body[id] = Number(n);
    else if (edit) body[id] = null;
  }
  const expires = v("expires");
  if (edit && expires === el("expires").dataset.initial) return body;  // unchanged: kept
  if (expires) body.expires_at = Date.parse(`${expires}T23:59:59Z`) / 1000;
  else if (edit) body.expires_at = null;
  return body;
}

// Show a key's secret, once. `onHide`: where keyboard focus goes once it is hidden.
function secretBox(box, rec, what, onHide) {
  const input = h("input", {id: "new-secret", readonly: true, value: rec.key,
    "aria-label": `Secret of key ${rec.name}`});
  const copied = h("span", {class: "notice", role: "status"});
  box.replaceChildren(h("h3", {}, `${what}: copy its secret now`),
    h("p", {}, `This is the only time the secret of key ${rec.name} (${rec.key_id}, tenant ` +
      `${rec.tenant}) is shown: only its hash is stored. If it is lost, rotate the key.`),
    input,
    h("button", {type: "button", onclick: async () => {
      input.select();
      try { await navigator.clipboard.writeText(rec.key); copied.textContent = "Copied."; } catch (_) {
        copied.textContent = "Selected: press Ctrl-C (or ⌘-C) to copy.";
      }
    }}, "Copy"),
    h("button", {type: "button", onclick: () => {
      box.replaceChildren();
      box.hidden = true;
      onHide();
    }}, "Hide the secret"),
    copied);
  box.hidden = false;
  input.focus();
  input.select();
}

function keysRegion(keys, actions) {
  if (!keys.length) return h("p", {class: "notice"}, "No API keys yet: the OpenAI API is " +
    "open or behind API_TOKEN until the first key is created.");
  return table(`${keys.length} key(s)`, ["Name", "Key id", "Tenant", "Secret ends in",
    "Models", "Limits", "Priority", "Expires", "Actions"], keys.map((k) => [
    k.name, h("code", {}, k.key_id), k.tenant, `…${k.hint}`, k.models.join(", "),
    limitsText(k), k.priority,
    k.expires_at ? [utcDate(k.expires_at), k.expired ? [" ", h("span",
      {class: "state state-FAILED"}, "expired")] : null] : "never",
    h("span", {}, ["Edit", "Rotate", "Revoke"].map((a) => h("button", {type: "button",
      class: a === "Revoke" ? "danger" : null, "aria-label": `${a} key ${k.name}`,
      onclick: () => actions[a](k)}, a)))]));
}

function tenantsRegion(tenants, editLimits) {
  if (!tenants.length) return h("p", {class: "notice"}, "No tenants yet.");
  return table(`${tenants.length} tenant(s)`, ["Tenant", "Keys", "Shared requests per minute",
    "Shared tokens per minute", "Actions"], tenants.map((t) => [t.tenant, String(t.keys),
    t.rpm ? num(t.rpm) : "no limit", t.tpm ? num(t.tpm) : "no limit",
    h("button", {type: "button", "aria-label": `Edit the limits of tenant ${t.tenant}`,
      onclick: () => editLimits(t)}, "Edit limits")]));
}

function keysPage(view) {
  const message = h("p", {class: "error", role: "alert"});
  const status = h("p", {class: "notice", role: "status"});
  const secret = h("div", {class: "secret", hidden: true});
  const keys = h("div"); const tenants = h("div");
  const editing = h("section", {"aria-labelledby": "edit-title", hidden: true});
  let refresh = null;
  // Focus goes to the status line once the control that had it is gone (a hidden form, a
  // revoked key's row), so a keyboard user is not dropped at the top of the page.
  status.tabIndex = -1;
  const done = (text) => {
    message.textContent = "";
    status.textContent = text;
    if (!view.contains(document.activeElement) || document.activeElement.closest("[hidden]")) {
      status.focus();
    }
    refresh();
  };
  const failed = (what) => (e) => { message.textContent = `${what}: ${e.message}`; };
  const showSecret = (rec, what) => secretBox(secret, rec, what, () => status.focus());
  const closeEdit = () => { editing.hidden = true; delete editing.dataset.keyId; };

  const create = h("form", {"aria-labelledby": "new-key-title", novalidate: true},
    keyFields("new"), h("button", {type: "submit", class: "primary"}, "Create key"));
  create.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let rec;
    try { rec = await api("POST", "/admin/keys", keyBody(create, "new", false)); } catch (e) {
      failed("Create")(e); return;
    }
    create.querySelector("#new-name").value = "";
    showSecret(rec, `Key ${rec.name} created`);
    done(`Key ${rec.name} created.`);
  });

  const actions = {
    Edit: (k) => {
      const form = h("form", {novalidate: true}, keyFields("edit", k),
        h("button", {type: "submit", class: "primary"}, "Save"),
        h("button", {type: "button", onclick: () => {
          closeEdit();
          status.focus();
        }}, "Cancel"));
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        try {
          await api("PATCH", `/admin/keys/${encodeURIComponent(k.key_id)}`,
            keyBody(form, "edit", true));
        } catch (e) { failed("Save")(e); return; }
        closeEdit();
        done(`Key ${k.name} saved.`);
      });
      editing.replaceChildren(h("h2", {id: "edit-title"}, `Edit key ${k.name}`),
        h("p", {class: "help"}, "Per-model limits (model_limits) are kept as they are: " +
          "change them with svllm keys update or PATCH /admin/keys/{id}."), form);
      editing.hidden = false;
      editing.dataset.keyId = k.key_id;
      form.querySelector("#edit-name").focus();
    },
    Rotate: async (k) => {
      if (!await confirmAction(`Rotate key ${k.name}? Its current secret stops working ` +
        "at once; clients need the new one.")) return;
      try {
        const rec = await api("POST", `/admin/keys/${encodeURIComponent(k.key_id)}/rotate`);
        showSecret(rec, `Key ${rec.name} rotated`);
        done(`Key ${k.name} rotated.`);
      } catch (e) { failed("Rotate")(e); }
    },
    Revoke: async (k) => {
      if (!await confirmAction(`Revoke key ${k.name} (${k.key_id})? Requests with it are ` +
        "refused (401) from then on. This cannot be undone.")) return;
      try {
        await api("DELETE", `/admin/keys/${encodeURIComponent(k.key_id)}`);
        if (editing.dataset.keyId === k.key_id) closeEdit();
        done(`Key ${k.name} revoked.`);
      } catch (e) { failed("Revoke")(e); }
    },
  };

  const limitsForm = h("form", {"aria-labelledby": "tenant-limits-title", novalidate: true},
    h("h3", {id: "tenant-limits-title"}, "Set a tenant's shared limits"),
    h("label", {for: "tl-tenant"}, "Tenant"), h("input", {id: "tl-tenant", name: "tenant"}),
    h("label", {for: "tl-rpm"}, "Shared requests per minute"),
    h("input", {id: "tl-rpm", name: "rpm", type: "number", min: "1", step: "1"}),
    h("label", {for: "tl-tpm"}, "Shared tokens per minute"),
    h("input", {id: "tl-tpm", name: "tpm", type: "number", min: "1", step: "1"}),
    h("p", {class: "help"}, "Every key of the tenant counts against these. Both are set at " +
      "once: an empty one is no limit (Edit limits in the table fills in the current ones)."),
    h("button", {type: "submit"}, "Set limits"));
  limitsForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const el = (id) => limitsForm.querySelector(`#${id}`);
    const tenant = el("tl-tenant").value.trim();
    let body;
    try {
      const rpm = numberOf(el("tl-rpm"), "Shared requests per minute");
      const tpm = numberOf(el("tl-tpm"), "Shared tokens per minute");
      body = {rpm: rpm ? Number(rpm) : null, tpm: tpm ? Number(tpm) : null};
    } catch (e) { failed("Set limits")(e); return; }
    try {
      await api("PUT", `/admin/tenants/${encodeURIComponent(tenant)}/limits`, body);
    } catch (e) { failed("Set limits")(e); return; }
    done(`Limits of tenant ${tenant} set.`);
  });

  view.append(
    h("section", {"aria-labelledby": "keys-title"}, h("h2", {id: "keys-title"}, "API keys"),
      h("p", {class: "help"}, "Clients send a key as their OpenAI api_key. Changes reach " +
        "every router within a second."), status, message, secret, keys),
    editing,
    h("section", {"aria-labelledby": "new-key-title"},
      h("h2", {id: "new-key-title"}, "Create an API key"), create),
    h("section", {"aria-labelledby": "tenants-title"},
      h("h2", {id: "tenants-title"}, "Tenants"), tenants, limitsForm));

  const editLimits = (t) => {
    limitsForm.querySelector("#tl-tenant").value = t.tenant;
    limitsForm.querySelector("#tl-rpm").value = t.rpm ? String(t.rpm) : "";
    limitsForm.querySelector("#tl-tpm").value = t.tpm ? String(t.tpm) : "";
    limitsForm.querySelector("#tl-rpm").focus();
  };
  let asked = 0;  // refreshes run also outside the timer (after a change): the last one wins
  refresh = async () => {
    const mine = ++asked;
    let k, t;
    try {
      [k, t] = await Promise.all([api("GET", "/admin/keys"), api("GET", "/admin/tenants")]);
    } catch (e) { if (mine === asked) message.textContent = e.message; return; }
    if (mine !== asked) return;  // a later refresh was asked for: its answer is newer
    update(keys, k.keys, (ks) => keysRegion(ks, actions));
    update(tenants, t.tenants, (ts) => tenantsRegion(ts, editLimits));
  };
  return refresh;
}

// ---------------------------------------------------------------- usage
// Hours back from now, as `svllm usage --hours`: the counters are per clock hour (UTC), so a
// period covers every hour it touches (the last hour: this one and the one before).
const PERIODS = [["1", "Last hour"], ["24", "Last 24 hours"], ["168", "Last 7 days"],
  ["720", "Last 30 days"]];
const GROUPS = [["key,model", "Key and model"], ["key", "Key"], ["model", "Model"],
  ["tenant", "Tenant"]];
const COUNTERS = [["requests", "Requests"], ["prompt_tokens", "Prompt tokens"],
  ["completion_tokens", "Completion tokens"], ["errors", "Errors"],
  ["rate_limited", "Rate-limited"]];

// Usage rows (one per tenant, key, model and hour) summed over the hours, per `group`.
function usageRows(rows, group, names) {
  const by = group.split(",");
  const sums = new Map();
  for (const r of rows) {
    const id = JSON.stringify([r.tenant, ...by.map((g) => g === "key" ? r.key_id : r[g])]);
    if (!sums.has(id)) sums.set(id, Object.assign({tenant: r.tenant, key_id: r.key_id,
      model: r.model}, Object.fromEntries(COUNTERS.map(([c]) => [c, 0]))));
    for (const [c] of COUNTERS) sums.get(id)[c] += r[c];
  }
  const keyName = (id) => names.has(id) ? `${names.get(id)} (${id})` : `${id} (revoked)`;
  const columns = {key: ["Key", (s) => keyName(s.key_id)], model: ["Model", (s) => s.model],
    tenant: ["Tenant", (s) => s.tenant]};
  const shown = (group === "tenant" ? [] : [columns.tenant]).concat(by.map((g) => columns[g]));
  return {columns: shown.map((c) => c[0]).concat(COUNTERS.map((c) => c[1])),
    rows: [...sums.values()].sort((a, b) => b.requests - a.requests).map((s) =>
      shown.map((c) => c[1](s)).concat(COUNTERS.map(([c]) => num(s[c]))))};
}

function usagePage(view) {
  const select = (id, label, options) => h("div", {}, h("label", {for: id}, label),
    h("select", {id, name: id}, options.map(([v, t]) => h("option", {value: v}, t))));
  const form = h("form", {class: "filters"}, select("usage-period", "Period", PERIODS),
    select("usage-tenant", "Tenant", [["", "All tenants"]]),
    select("usage-group", "Per", GROUPS));
  form.querySelector("#usage-period").value = "24";
  const summary = h("p", {class: "summary", "aria-live": "polite"});
  const message = h("p", {class: "error", role: "alert"});
  const rows = h("div");
  view.append(h("section", {"aria-labelledby": "usage-title"},
    h("h2", {id: "usage-title"}, "Usage"),
    h("p", {class: "help"}, "What each API key used, counted by the routers per clock hour " +
      "(UTC): a period covers every hour it touches. Requests made with API_TOKEN or the " +
      "admin token are not counted."),
    form, message, summary, rows));
  let refresh = null;
  let asked = 0;  // a change of filter refreshes at once: the last one asked for wins
  form.addEventListener("change", () => refresh());
  refresh = async () => {
    const mine = ++asked;
    const v = (id) => form.querySelector(`#${id}`).value;
    const hours = Number(v("usage-period"));
    const now = Date.now() / 1000;
    let q = `from=${Math.floor(now - hours * 3600)}&to=${Math.floor(now)}`;
    if (v("usage-tenant")) q += `&tenant=${encodeURIComponent(v("usage-tenant"))}`;
    let u, k, t;
    try {
      [u, k, t] = await Promise.all([api("GET", `/admin/usage?${q}`), api("GET", "/admin/keys"),
        api("GET", "/admin/tenants")]);
    } catch (e) { if (mine === asked) message.textContent = e.message; return; }
    if (mine !== asked) return;
    message.textContent = "";
    const tenantSelect = form.querySelector("#usage-tenant");
    const chosen = tenantSelect.value;
    update(tenantSelect, t.tenants.map((x) => x.tenant), (names) => [h("option", {value: ""},
      "All tenants"), ...names.map((n) => h("option", {value: n, selected: n === chosen}, n))]);
    update(summary, u.total, (total) => COUNTERS.map(([c, label]) =>
      h("span", {}, `${label}: ${num(total[c])}`)));
    const names = new Map(k.keys.map((x) => [x.key_id, x.name]));
    update(rows, [u.rows, v("usage-period"), v("usage-group"), [...names]], () => {
      if (!u.rows.length) return h("p", {class: "notice"}, "No usage in this period.");
      const view = usageRows(u.rows, v("usage-group"), names);
      return table(`${view.rows.length} row(s), ${PERIODS.find((p) => p[0] ===
        v("usage-period"))[1].toLowerCase()}`, view.columns, view.rows);
    });
  };
  refresh.every = USAGE_REFRESH_MS;
  return refresh;
}

// ---------------------------------------------------------------- routing
function route() {
  clearInterval(timer);
  timer = null;
  current = null;
  const signedIn = token() !== null;
  document.getElementById("login").hidden = signedIn;
  document.getElementById("nav").hidden = !signedIn;
  const view = document.getElementById("view");
  view.replaceChildren();
  if (!signedIn) { document.getElementById("token").focus(); return; }
  const hash = location.hash || "#/";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === hash) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const model = hash.match(/^#\/model\/(.+)$/);
  if (model) current = modelPage(view, decodeURIComponent(model[1]));
  else if (hash === "#/register") current = registerPage(view);
  else if (hash === "#/playground") current = playground(view);
  else if (hash === "#/keys") current = keysPage(view);
  else if (hash === "#/usage") current = usagePage(view);
  else current = overview(view);
  const heading = view.querySelector("h2");
  if (heading) document.title = `${heading.textContent} – svllm console`;
  if (current) {
    // One refresh at a time: a slow one is not overtaken (the log tail would repeat).
    const refresh = current;
    let busy = false;
    const tick = async () => {
      if (busy || refresh !== current) return;
      busy = true;
      try { await refresh(); } finally { busy = false; }
    };
    tick();
    timer = setInterval(tick, refresh.every || REFRESH_MS);
  }
}

document.getElementById("login-form").addEventListener("submit", signIn);
document.getElementById("signout").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", route);
route();
