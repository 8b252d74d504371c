// The console (issue 17): a static page on the control plane's public API.
// Every rule (who sees which company, who may do what) is the API's: this page
// only shows what the API answers, and the API's errors inline where they belong.
"use strict";

const TOKEN_KEY = "llmgw.console.token";
const ENDED = "ended";  // the query parameter saying the last session ended under the page
const PALETTE = ["#1f4bc4", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285",
                 "#5c940d", "#e67700", "#364fc7", "#a61e4d"];
const OTHER_COLOUR = "#868e96";
const RANK = {member: 0, owner: 1, admin: 2};
const MORE_COMPANIES = "more";  // the picker's last choice when it holds only the first companies
// A list is walked `size` rows a request, `pages` requests at a time; a chart stacks
// `series` series; the ledger and the audit read `more` rows a page. The browser
// tests shrink them (an init script sets `window.llmgwConsolePaging` first) rather
// than create thousands of rows; only whole numbers from 1 to 200 count.
const PAGING = pagingOf(window.llmgwConsolePaging);

function pagingOf(asked) {
  const paging = {size: 200, pages: 20, series: 10, more: 50};
  for (const key of Object.keys(paging)) {
    const value = asked && Object.hasOwn(asked, key) ? asked[key] : null;
    if (Number.isInteger(value) && value >= 1 && value <= 200) paging[key] = value;
  }
  return Object.freeze(paging);
}

const state = {
  token: null,
  me: null,            // /v1/me, or null for the admin token
  platformAdmin: false,
  role: "member",
  companyId: null,     // the company the sections act on (null: every company)
  charts: {},
  auditCursor: null,
  ledgerCursor: null,
  pages: {},           // list name -> pages the owner asked to see (`allPages`)
  started: false,      // signed in and drawn: a 401 from now on means the session ended
  view: {},            // the tab and company last opened (`openTab`): see `superseded`
  superseded: 0,       // loads dropped because a later one began (read by the tests)
};
window.llmgwConsole = state;  // read by the browser tests

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  }
  return node;
}

function td(text, cls) { return el("td", cls ? {class: cls} : {}, text ?? "—"); }

function orNone(rows, columns) {
  // An empty table says so, rather than looking broken.
  return rows.length ? rows : [el("tr", {class: "empty"}, el("td", {colspan: String(columns)}, "None yet."))];
}

function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : "—"; }

// A read answered 429 with a short `Retry-After` (the company's heavy-read places
// are full: a colleague's console, the owner's own scripts) is asked again after it,
// a few times, while its tab is still the one open; anything else is answered as is.
const BUSY_RETRIES = 3;
const BUSY_WAIT_MAX_S = 10;

async function api(method, path, body) {
  const view = state.view;
  for (let attempt = 0; ; attempt++) {
    const result = await call(method, path, body);
    const wait = result.retryAfter;
    if (method !== "GET" || result.status !== 429 || !(wait >= 0 && wait <= BUSY_WAIT_MAX_S)
        || attempt >= BUSY_RETRIES || view !== state.view) return result;
    $("#status").textContent = `The control plane is busy: asking again in ${wait} s…`;
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
  }
}

async function call(method, path, body) {
  const headers = {Authorization: `Bearer ${state.token}`};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {method, headers,
      body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (err) {
    return {ok: false, status: 0, message: "The control plane cannot be reached.", code: "network"};
  }
  if (response.status === 401 && state.started) sessionEnded();
  if (response.status === 204) return {ok: true, status: 204, data: null};
  let doc = {};
  try { doc = await response.json(); } catch (err) { doc = {}; }
  if (response.ok && doc.success) return {ok: true, status: response.status, data: doc.data, meta: doc.meta};
  return {ok: false, status: response.status,
          message: doc.message || `The request failed (${response.status}).`,
          code: doc.error ? doc.error.code : "error",
          retryAfter: /^\d+$/.test(response.headers.get("Retry-After") || "")
            ? Number(response.headers.get("Retry-After")) : null};
}

function showError(id, result) {
  const node = $(id);
  node.textContent = result && !result.ok ? result.message : "";
  return result && result.ok;
}

// A tab whose calls did not all succeed shows the first failure and no rows at all:
// never the rows it showed before (another company's, another range's) under the
// error, nor the walked part of a list as if it were the whole. True when one failed.
function failedLoad(tab, errorId, results) {
  const failed = results.find((r) => !r.ok);
  showError(errorId, failed || {ok: true});
  if (failed) clearPanel(tab);
  return Boolean(failed);
}

function clearPanel(tab) {
  const panel = $(`#tab-${tab}`);
  for (const body of panel.querySelectorAll("tbody")) body.replaceChildren();
  // Pickers filled from the API too: none may offer a row of before (a user of the
  // previously chosen company to mint a key for).
  for (const select of panel.querySelectorAll("select[data-from-api], datalist")) select.replaceChildren();
  for (const node of panel.querySelectorAll(".partial")) node.remove();
  for (const node of panel.querySelectorAll("#usage-totals, #balances")) node.replaceChildren();
  for (const node of panel.querySelectorAll("#ledger-more, #audit-more")) node.hidden = true;
  if (tab === "usage") {
    for (const chart of Object.values(state.charts)) chart.destroy();
    state.charts = {};
  }
}

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") q.set(key, value);
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

function companyParam() { return state.companyId ? {company_id: state.companyId} : {}; }

// --- sign in ---------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  $("#signin-error").textContent = "";
  const response = await fetch("/v1/auth/login", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({email: $("#email").value, password: $("#password").value})});
  const doc = await response.json().catch(() => ({}));
  if (!response.ok || !doc.success) {
    $("#signin-error").textContent = doc.message || "Sign-in failed.";
    return;
  }
  await start(doc.data.access_token);
}

async function useToken(event) {
  event.preventDefault();
  await start($("#token").value.trim());
}

async function start(token) {
  state.token = token;
  const me = await api("GET", "/v1/me");
  if (me.ok) {
    state.me = me.data;
    state.role = me.data.user.role;
    state.companyId = me.data.company.id;
  } else {
    // The admin token has no user: it is the platform admin if it may list companies.
    const companies = await api("GET", "/v1/admin/companies?limit=1");
    if (!companies.ok) {
      $("#signin-error").textContent = me.message;
      state.token = null;
      return;
    }
    state.me = null;
    state.role = "admin";
    state.companyId = null;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#signin").hidden = true;
  $("#sign-out").hidden = false;
  $("#who").hidden = false;
  $("#who").textContent = state.me
    ? `${state.me.user.email} · ${state.role} · ${state.me.company.name}`
    : "platform admin token";
  $("#who").title = $("#who").textContent;  // whole on hover when the pill shortens it
  if (RANK[state.role] < RANK.owner) {
    // A member has no console: nothing of it is even drawn.
    $("#denied").hidden = false;
    return;
  }
  state.platformAdmin = state.role === "admin";
  const asked = new URLSearchParams(location.search).get("company");
  if (asked) state.companyId = asked;
  if (state.platformAdmin) await loadCompanyPicker();
  fillRoleChoices();
  $("#app").hidden = false;
  state.started = true;
  await openTab(new URLSearchParams(location.search).get("tab") || "usage");
}

// The token ended while the page was open (expired, signed out elsewhere, its owner
// disabled): nothing of the page may stay on screen nor the dead token in the tab's
// storage. A fresh load of the page is the one sure wipe; the tab and company come
// back after the next sign-in, with a word saying why.
function sessionEnded() {
  if (!state.started) return;
  state.started = false;
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  const params = new URLSearchParams(location.search);
  params.set("tab", currentTab());
  params.set(ENDED, "1");
  location.replace(`/console?${params}`);
}

async function signOut() {
  // Ends the token on the server too, so a copy of it (a lost laptop, a shared
  // screen) is dead as well. API keys and the admin token are not sessions: the
  // API refuses those with 400 and the page just forgets them.
  state.started = false;  // its own 401 (a token already dead) is no news to tell
  if (state.token) await api("POST", "/v1/auth/logout");
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  location.href = "/console";
}

async function loadCompanyPicker() {
  const picker = $("#company");
  picker.replaceChildren(el("option", {value: ""}, "All companies"));
  // Not tied to a tab's view: the header's picker outlives every tab.
  const companies = await allPages("/v1/admin/companies", {}, "companies", false);
  if (companies.ok) {
    for (const company of companies.data.items) {
      picker.append(el("option", {value: company.id}, company.name));
    }
    if (companies.data.next_cursor) {
      // The picker says it is cut short, and this choice walks further.
      picker.append(el("option", {value: MORE_COMPANIES},
        `Show ${PAGING.pages * PAGING.size} more companies…`));
    }
  } else {
    // Not an empty platform: the picker says its list failed (the tab's own error
    // line belongs to the tab, which clears it when it loads).
    picker.append(el("option", {value: "", disabled: ""},
      `Companies could not be listed: ${companies.message}`));
  }
  // A company chosen by link (`?company=`) past the walked part is still the one shown.
  if (state.companyId && ![...picker.options].some((o) => o.value === state.companyId)) {
    picker.append(el("option", {value: state.companyId}, state.companyId));
  }
  picker.value = state.companyId || "";
  $("#company-picker").hidden = false;
}

function fillRoleChoices() {
  // Only roles at or below the caller's; the API refuses anything else anyway.
  const roles = Object.keys(RANK).filter((role) => RANK[role] <= RANK[state.role]);
  $("#invite-role").replaceChildren(...roles.map((role) => el("option", {value: role}, role)));
}

// --- tabs ----------------------------------------------------------------------------

const LOADERS = {
  usage: loadUsage, credits: loadCredits, users: loadUsers, keys: loadKeys,
  providers: loadProviders, plans: loadPlans, audit: () => loadAudit(false),
};

async function openTab(name) {
  // `?tab=` comes from a link anyone can write: only the loaders' own names count
  // (`__proto__` or `constructor` would find Object's members and break the page).
  if (!Object.hasOwn(LOADERS, name)) name = "usage";
  for (const button of document.querySelectorAll(".tab")) {
    if (button.dataset.tab === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const panel of document.querySelectorAll(".tab-panel")) {
    panel.hidden = panel.id !== `tab-${name}`;
  }
  $("#scope-error").textContent = "";
  $("#status").textContent = "Loading…";
  document.body.dataset.loaded = "";
  const view = state.view = {tab: name, companyId: state.companyId};
  await LOADERS[name]();
  if (view !== state.view) return;  // a later tab or company is loading: it says when
  $("#status").textContent = "";
  document.body.dataset.loaded = name;
}

// Answers come back in any order: a load begun for the tab or company the owner has
// since left must draw nothing, or its late answer lands over the one chosen (the
// previous company's users under the new one's name). A loader takes the view when
// it begins and, after each wait, draws only if no later view began.
function superseded(view) {
  if (view === state.view) return false;
  state.superseded += 1;
  return true;
}

function currentTab() { return document.querySelector(".tab[aria-current=page]").dataset.tab; }

function needCompany(errorId) {
  if (state.companyId) return true;
  $(errorId).textContent = "Choose a company first.";
  return false;
}

// --- usage -----------------------------------------------------------------------------

function isoDay(date) { return date.toISOString().slice(0, 10); }

function defaultRange() {
  if (!$("#to").value) {
    const today = new Date();
    $("#to").value = isoDay(today);
    $("#from").value = isoDay(new Date(today.getTime() - 29 * 86400000));
  }
}

// Walks a list for a table (of the view it began in, unless not `tied`: it stops
// once another begins): `state.pages[list]` requests of `PAGING.size` rows
// (`PAGING.pages` until the owner asks for more), from the first page each time, so
// a table is never a stale mix. The answer keeps the last `next_cursor`: a list cut
// short says so (`partial`), never silently.
async function allPages(path, params, list, tied = true) {
  const items = [];
  const labels = {};
  let cursor = null;
  const pages = state.pages[list] || PAGING.pages;
  const view = state.view;
  for (let page = 0; page < pages; page++) {
    const result = await api("GET", path + query({...params, limit: PAGING.size, cursor}));
    if (!result.ok) return result;
    // The owner has left for another tab or company: its loader draws nothing, so
    // asking for the rest (a usage series: heavy reads) would only hold places.
    if (tied && view !== state.view) return {ok: false, status: 0, message: "", code: "superseded"};
    items.push(...result.data.items);
    mergeLabels(labels, result);
    cursor = result.data.next_cursor;
    if (!cursor) break;
  }
  return {ok: true, data: {items, next_cursor: cursor || null}, meta: {labels}, list};
}

// Under `anchor`, a notice that `result` (a list `allPages` walked) holds only the
// first rows of more, with a button that walks `PAGING.pages` pages further and
// reloads the tab; gone once the list is whole.
function partial(anchor, result, text) {
  for (const old of document.querySelectorAll(`.partial[data-list="${result.list}"]`)) old.remove();
  if (!result.ok || !result.data.next_cursor) return;
  const step = PAGING.pages * PAGING.size;
  const more = async () => {
    state.pages[result.list] = (state.pages[result.list] || PAGING.pages) + PAGING.pages;
    if (result.list === "companies" && state.platformAdmin) await loadCompanyPicker();
    await openTab(currentTab());
  };
  $(anchor).after(el("p", {class: "notice partial", role: "status", dataset: {list: result.list}},
    `${text(result.data.items.length)}: there are more. `,
    el("button", {type: "button", class: "quiet", onclick: more}, `Show ${step} more`)));
}

// The summary names its ids beside its items (`meta.labels`: {user_id: {id: email},
// api_key_id: {id: prefix}}); an item holds only its grouped keys and totals.
function mergeLabels(into, result) {
  const found = (result.meta && result.meta.labels) || {};
  for (const [key, names] of Object.entries(found)) into[key] = {...(into[key] || {}), ...names};
  return into;
}

function labelled(result, key, id) {
  const names = (result.meta && result.meta.labels && result.meta.labels[key]) || {};
  return Object.hasOwn(names, id) ? names[id] : null;
}

function daysBetween(from, to) {
  const days = [];
  for (let d = new Date(`${from}T00:00:00Z`); isoDay(d) <= to; d = new Date(d.getTime() + 86400000)) {
    days.push(isoDay(d));
  }
  return days;
}

async function loadUsage() {
  const view = state.view;
  defaultRange();
  const from = $("#from").value, to = $("#to").value, split = $("#split").value;
  const range = {...companyParam(), from, to};
  const [series, users, keys, ttft] = await Promise.all([
    allPages("/v1/usage/summary", {...range, group_by: `day,${split}`}, "series"),
    api("GET", `/v1/usage/summary${query({...range, group_by: "user", order: "cost", limit: 10})}`),
    api("GET", `/v1/usage/summary${query({...range, group_by: "api_key", order: "cost", limit: 10})}`),
    api("GET", `/v1/usage/ttft${query(range)}`),
  ]);
  if (superseded(view)) return;
  if (failedLoad("usage", "#usage-error", [series, users, keys, ttft])) return;
  partial("#usage-totals", series, (n) =>
    `The charts, their numbers and the totals cover the first ${n} groups (day and ${split})`);
  const email = (result, i) => labelled(result, "user_id", i.user_id) || i.user_id;
  const labelOf = (item) => split === "model" ? item.model : email(series, item);
  drawCharts(series.data.items, daysBetween(from, to), split, labelOf);
  fillSpendTable(series.data.items, labelOf);
  fillTop("#top-users", users.data.items, (i) => email(users, i));
  fillTop("#top-keys", keys.data.items, (i) => i.api_key_id
    ? `${labelled(keys, "api_key_id", i.api_key_id) || i.api_key_id}…` : "(signed-in sessions)");
  $("#ttft tbody").replaceChildren(...ttft.data.items.map((i) => el("tr", {},
    td(i.model), td(String(i.streams), "num"), td(`${i.p50_ms} ms`, "num"), td(`${i.p95_ms} ms`, "num"))));
  const cost = series.data.items.reduce((sum, i) => sum + Number(i.cost), 0);
  const streams = series.data.items.reduce((sum, i) => sum + i.streams, 0);
  $("#usage-totals").textContent =
    `${streams} streams, ${cost.toFixed(6)} credits from ${from} to ${to}.`;
}

// A chart stacks the `PAGING.series` costliest series and one "Other" for the rest
// (the table under it keeps every row): a stack per user of a company of thousands
// is a legend no one reads. Summed in one pass over the groups: the former scan of
// every group per series and day froze the tab for a minute at 1,000 users.
function drawCharts(items, days, split, labelOf) {
  const cost = new Map();
  for (const i of items) cost.set(labelOf(i), (cost.get(labelOf(i)) || 0) + Number(i.cost));
  const ranked = [...cost.keys()].sort((a, b) => cost.get(b) - cost.get(a) || (a < b ? -1 : 1));
  const shown = new Set(ranked.slice(0, PAGING.series));
  const rest = ranked.length - shown.size;
  const other = rest ? `Other (${rest} ${split === "model" ? "models" : "users"})` : null;
  const names = [...shown].sort().concat(other ? [other] : []);
  const column = new Map(days.map((day, n) => [day, n]));
  const build = (value) => {
    const rows = new Map(names.map((name) => [name, days.map(() => 0)]));
    for (const i of items) {
      const n = column.get(i.day);
      const label = labelOf(i);
      if (n !== undefined) rows.get(shown.has(label) ? label : other)[n] += value(i);
    }
    return {labels: days, datasets: names.map((name, n) => ({
      label: name,
      backgroundColor: name === other ? OTHER_COLOUR : PALETTE[n % PALETTE.length],
      data: rows.get(name),
    }))};
  };
  draw("spend-chart", build((i) => Number(i.cost)));
  draw("tokens-chart", build((i) => i.input_tokens + i.output_tokens));
}

function draw(id, data) {
  if (typeof Chart === "undefined") return;  // the library failed to load: tables remain
  if (state.charts[id]) state.charts[id].destroy();
  state.charts[id] = new Chart(document.getElementById(id), {
    type: "bar",
    data,
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: {x: {stacked: true, ticks: {maxRotation: 0, autoSkipPadding: 12}},
               y: {stacked: true, beginAtZero: true}},
      plugins: {legend: {position: "bottom"}},
    },
  });
}

function fillSpendTable(items, labelOf) {
  $("#spend-table tbody").replaceChildren(...items.map((i) => el("tr", {},
    td(i.day), td(labelOf(i)), td(String(i.streams), "num"),
    td(String(i.input_tokens + i.output_tokens), "num"), td(i.cost, "num"))));
}

function fillTop(id, items, name) {
  $(`${id} tbody`).replaceChildren(...(items.length ? items.map((i) => el("tr", {},
    td(name(i)), td(String(i.streams), "num"), td(i.cost, "num")))
    : [el("tr", {}, el("td", {colspan: "3"}, "No usage in this range."))]));
}

// --- credits -------------------------------------------------------------------------

async function loadCredits(more = false) {
  const view = state.view;
  $("#companies-card").hidden = !state.platformAdmin;
  const ledgerPath = `/v1/credits${query({limit: PAGING.more, cursor: more ? state.ledgerCursor : null})}`;
  if (more) {
    // The ledger's next page: on failure the rows so far stay, and so does "More".
    const next = await api("GET", ledgerPath);
    if (superseded(view)) return;
    if (showError("#credits-error", next)) fillLedger(next.data, true);
    return;
  }
  // The ledger is the caller's own company's (`/v1/credits`); the admin token has none.
  const none = {ok: true, data: null};
  const [companies, result] = await Promise.all([
    state.platformAdmin ? allPages("/v1/admin/companies", {}, "companies") : none,
    state.me ? api("GET", ledgerPath) : none,
  ]);
  if (superseded(view)) return;
  if (failedLoad("credits", "#credits-error", [companies, result])) return;
  if (companies.data) {
    partial("#companies", companies, (n) => `Showing the first ${n} companies`);
    $("#companies tbody").replaceChildren(...companies.data.items.map((c) =>
      el("tr", {}, td(c.name), td(c.credits, "num"))));
  }
  if (!result.data) {
    $("#balances").replaceChildren();
    $("#ledger tbody").replaceChildren();
    return;
  }
  const data = result.data;
  $("#balances").replaceChildren(...[["Balance", data.balance], ["Held", data.held],
    ["Available", data.available]].map(([name, value]) =>
    el("div", {}, el("dt", {}, name), el("dd", {id: `credits-${name.toLowerCase()}`}, value))));
  fillLedger(data, false);
}

function fillLedger(data, append) {
  const rows = data.entries.map((e) => el("tr", {},
    td(when(e.created_at)), td(e.kind), td(e.amount, "num"), td(e.reason),
    el("td", {}, e.reservation_id ? el("button", {type: "button", class: "quiet",
      onclick: () => auditFor(e.reservation_id)}, "Trail") : "—")));
  if (append) $("#ledger tbody").append(...rows);
  else $("#ledger tbody").replaceChildren(...rows);
  state.ledgerCursor = data.next_cursor;
  $("#ledger-more").hidden = !data.next_cursor;
}

async function auditFor(reservationId) {
  // A reservation's trail: its hold, charge and release, each with actor and request.
  state.auditReservation = reservationId;
  await openTab("audit");
}

// --- users and revocations ---------------------------------------------------------------

async function loadUsers() {
  const view = state.view;
  if (!needCompany("#users-error")) return;
  const [users, revocations] = await Promise.all([
    allPages("/v1/admin/users", {company_id: state.companyId}, "users"),
    allPages("/v1/admin/revocations", {company_id: state.companyId}, "revocations"),
  ]);
  if (superseded(view)) return;
  if (failedLoad("users", "#users-error", [users, revocations])) return;
  partial("#users", users, (n) => `Showing the first ${n} users`);
  partial("#revocations", revocations, (n) => `Showing the first ${n} revocations`);
  state.users = users.data.items;
  const self = (u) => state.me && u.id === state.me.user.id;
  $("#users tbody").replaceChildren(...orNone(users.data.items.map((u) => el("tr", {},
    td(u.email), self(u) ? td(u.role) : el("td", {}, roleSelect(u)),
    td(u.disabled_at ? `disabled ${when(u.disabled_at)}` : "active"),
    el("td", {}, u.disabled_at || (state.me && u.id === state.me.user.id) ? "—"
      : el("button", {type: "button", class: "danger", "aria-label": `Disable ${u.email}`,
        onclick: () => disableUser(u)}, "Disable")))), 4));
  const emails = Object.fromEntries(users.data.items.map((u) => [u.id, u.email]));
  $("#revocations tbody").replaceChildren(...orNone(revocations.data.items.map((r) => el("tr", {},
    td(`${r.kind} ${emails[r.value] || r.value}`), td(when(r.created_at)), td(r.reason),
    td(r.lifted_at ? `lifted ${when(r.lifted_at)}` : "in force"),
    el("td", {}, r.lifted_at ? "—" : el("button", {type: "button", class: "quiet",
      onclick: () => liftRevocation(r)}, "Lift")))), 5));
}

function roleSelect(user) {
  const select = el("select", {"aria-label": `Role of ${user.email}`, dataset: {user: user.id}});
  for (const role of Object.keys(RANK).filter((r) => RANK[r] <= RANK[state.role])) {
    select.append(el("option", {value: role}, role));
  }
  select.value = user.role;
  select.addEventListener("change", () => changeRole(user, select));
  return select;
}

async function changeRole(user, select) {
  const role = select.value;
  if (!confirm(`Make ${user.email} ${role === "admin" ? "an" : "a"} ${role}?`)) {
    select.value = user.role;
    return;
  }
  const result = await api("PATCH", `/v1/admin/users/${encodeURIComponent(user.id)}`, {role});
  if (!showError("#users-error", result)) { select.value = user.role; return; }
  await loadUsers();
  $("#status").textContent = `${user.email} is now ${role}.`;
}

async function invite(event) {
  event.preventDefault();
  const body = {company_id: state.companyId, email: $("#invite-email").value,
                role: $("#invite-role").value};
  if ($("#invite-password").value) body.password = $("#invite-password").value;
  if (!state.companyId) { $("#invite-error").textContent = "Choose a company first."; return; }
  const result = await api("POST", "/v1/admin/users", body);
  if (!showError("#invite-error", result)) return;
  $("#invite-form").reset();
  fillRoleChoices();
  $("#status").textContent = `Invited ${result.data.email}.`;
  await loadUsers();
}

async function disableUser(user) {
  if (!confirm(`Disable ${user.email}? Their sign-ins, API keys and running streams stop.`)) return;
  const result = await api("POST", "/v1/admin/revocations", {user_id: user.id, reason: "disabled in the console"});
  if (showError("#users-error", result)) await loadUsers();
}

async function revokeStream(event) {
  event.preventDefault();
  const jti = $("#revoke-jti").value.trim();
  if (!jti) { $("#jti-error").textContent = "jti: is required"; return; }
  if (!confirm(`Revoke stream token ${jti}? A running stream ends at once.`)) return;
  const result = await api("POST", "/v1/admin/revocations", {jti, reason: "revoked in the console"});
  if (!showError("#jti-error", result)) return;
  $("#jti-form").reset();
  await loadUsers();
}

async function liftRevocation(revocation) {
  if (!confirm(`Lift the revocation of ${revocation.kind} ${revocation.value}?`)) return;
  const result = await api("DELETE", `/v1/admin/revocations/${encodeURIComponent(revocation.id)}`);
  if (showError("#users-error", result)) await loadUsers();
}

// --- API keys ----------------------------------------------------------------------------

async function loadKeys() {
  const view = state.view;
  if (!needCompany("#keys-error")) return;
  const [keys, users] = await Promise.all([
    allPages("/v1/admin/api-keys", {company_id: state.companyId}, "keys"),
    allPages("/v1/admin/users", {company_id: state.companyId}, "users"),
  ]);
  if (superseded(view)) return;
  if (failedLoad("keys", "#keys-error", [keys, users])) return;
  partial("#keys", keys, (n) => `Showing the first ${n} API keys`);
  partial("#key-form", users, (n) => `The "For" list and the emails name the first ${n} users`);
  const emails = Object.fromEntries(users.data.items.map((u) => [u.id, u.email]));
  $("#key-user").replaceChildren(...users.data.items.filter((u) => !u.disabled_at)
    .map((u) => el("option", {value: u.id}, `${u.email} (${u.role})`)));
  $("#keys tbody").replaceChildren(...orNone(keys.data.items.map((k) => el("tr", {},
    td(`${k.prefix}…`), td(emails[k.user_id] || k.user_id), td(k.scopes.join(" ")),
    td(when(k.last_used_at)), td(k.revoked_at ? `revoked ${when(k.revoked_at)}` : "active"),
    el("td", {}, k.revoked_at ? "—" : el("button", {type: "button", class: "danger",
      "aria-label": `Revoke ${k.prefix}`, onclick: () => revokeKey(k)}, "Revoke")))), 6));
}

async function createKey(event) {
  event.preventDefault();
  $("#new-key-box").hidden = true;
  const scopes = [...document.querySelectorAll("input[name=scope]:checked")].map((i) => i.value);
  const result = await api("POST", "/v1/admin/api-keys", {user_id: $("#key-user").value, scopes});
  if (!showError("#key-error", result)) return;
  $("#new-key").textContent = result.data.key;  // shown once: never stored by the page
  $("#new-key-box").hidden = false;
  await loadKeys();
}

async function revokeKey(key) {
  if (!confirm(`Revoke the key ${key.prefix}…? Anything using it stops working.`)) return;
  const result = await api("DELETE", `/v1/admin/api-keys/${encodeURIComponent(key.id)}`);
  if (showError("#keys-error", result)) await loadKeys();
}

// --- providers ---------------------------------------------------------------------------

async function loadProviders() {
  const view = state.view;
  if (!needCompany("#providers-error")) return;
  const path = `/v1/admin/companies/${encodeURIComponent(state.companyId)}/providers`;
  const [configured, models] = await Promise.all([allPages(path, {}, "providers"), api("GET", "/v1/models")]);
  if (superseded(view)) return;
  if (failedLoad("providers", "#providers-error", [configured, models])) return;
  partial("#providers", configured, (n) => `Showing the first ${n} providers`);
  const catalog = models.data.models;
  const providers = [...new Set(catalog.map((m) => m.provider).concat(
    configured.data.items.map((p) => p.provider)))].sort();
  const keep = $("#provider").value;
  $("#provider").replaceChildren(...providers.map((p) => el("option", {value: p}, p)));
  if (keep) $("#provider").value = keep;
  $("#default-model").replaceChildren(el("option", {value: ""}, "(unchanged)"),
    ...catalog.map((m) => el("option", {value: m.id}, m.id)));
  state.providers = Object.fromEntries(configured.data.items.map((p) => [p.provider, p]));
  const keepModelProvider = $("#model-provider").value;
  $("#model-provider").replaceChildren(...providers.map((p) => el("option", {value: p}, p)));
  if (keepModelProvider) $("#model-provider").value = keepModelProvider;
  $("#model-ids").replaceChildren(...catalog.map((m) => el("option", {value: m.id})));
  $("#overrides tbody").replaceChildren(...orNone(configured.data.items.flatMap((p) =>
    Object.entries(p.overrides || {}).map(([id, spec]) => el("tr", {},
      td(p.provider), td(id), td(JSON.stringify(spec)),
      el("td", {}, el("button", {type: "button", class: "danger", "aria-label": `Remove override of ${id}`,
        onclick: () => removeOverride(p.provider, id)}, "Remove"))))), 4));
  $("#providers tbody").replaceChildren(...orNone(configured.data.items.map((p) => el("tr", {},
    td(p.provider), td(p.has_key ? "own key set" : "platform key"),
    td(p.models.map((m) => m.id).join(", ") || "—"),
    el("td", {}, el("button", {type: "button", class: "danger",
      "aria-label": `Remove ${p.provider}`, onclick: () => removeProvider(p.provider)}, "Remove")))), 4));
}

async function saveProvider(event) {
  event.preventDefault();
  const body = {};
  if ($("#provider-key").value) body.api_key = $("#provider-key").value;
  if ($("#default-model").value) body.default_model = $("#default-model").value;
  const provider = encodeURIComponent($("#provider").value);
  const result = await api("PUT",
    `/v1/admin/companies/${encodeURIComponent(state.companyId)}/providers/${provider}`, body);
  if (!showError("#provider-error", result)) return;
  $("#provider-key").value = "";  // never kept, never shown back
  $("#status").textContent = `Saved ${result.data.provider}.`;
  await loadProviders();
}

function overridesOf(provider) {
  const configured = (state.providers || {})[provider];
  return configured ? {...configured.overrides} : {};
}

async function putModels(provider, models, errorId) {
  // `models` replaces the provider's overrides: send them all, changed.
  const result = await api("PUT",
    `/v1/admin/companies/${encodeURIComponent(state.companyId)}/providers/${encodeURIComponent(provider)}`,
    {models});
  if (showError(errorId, result)) await loadProviders();
  return result.ok;
}

async function saveModel(event) {
  event.preventDefault();
  const id = $("#model-id").value.trim();
  if (!id) { $("#model-error").textContent = "model id: is required"; return; }
  const partial = {};
  const number = (sel) => $(sel).value === "" ? undefined : Number($(sel).value);
  if (number("#model-context") !== undefined) partial.context_length = number("#model-context");
  if (number("#model-max-output") !== undefined) partial.max_output_tokens = number("#model-max-output");
  const price = {};
  if ($("#model-price-in").value.trim()) price.input_per_mtok = $("#model-price-in").value.trim();
  if ($("#model-price-out").value.trim()) price.output_per_mtok = $("#model-price-out").value.trim();
  if (Object.keys(price).length) partial.price = price;
  if ($("#model-hidden").checked) partial.enabled = false;
  const provider = $("#model-provider").value;
  const models = overridesOf(provider);
  models[id] = partial;
  if (await putModels(provider, models, "#model-error")) {
    $("#model-form").reset();
    $("#status").textContent = `Saved model ${id}.`;
  }
}

async function removeOverride(provider, id) {
  if (!confirm(`Remove the company's override of ${id}? The packaged model applies again.`)) return;
  const models = overridesOf(provider);
  delete models[id];
  await putModels(provider, models, "#providers-error");
}

async function removeProvider(provider) {
  if (!confirm(`Remove your ${provider} key and models? Requests fall back to the platform's key.`)) return;
  const result = await api("DELETE",
    `/v1/admin/companies/${encodeURIComponent(state.companyId)}/providers/${encodeURIComponent(provider)}`);
  if (showError("#providers-error", result)) await loadProviders();
}

// --- agents, teams, budgets (DESIGN §11; shown once the gateway has them) ------------------

function companyPath(rest) {
  return `/v1/admin/companies/${encodeURIComponent(state.companyId)}/${rest}`;
}

function missingRoute(result) {
  // A gateway without the feature answers the route itself with a bare 404.
  return !result.ok && result.status === 404 && result.message === "Not found.";
}

function section(name, result) {
  // Hide a section the gateway does not have yet; say so instead. True when it has
  // the section and its list came.
  const off = missingRoute(result);
  $(`#${name}-off`).hidden = !off;
  $(`#${name.slice(0, -1)}-form`).hidden = off;
  $(`#${name}`).hidden = off;
  return !off && result.ok;
}

async function loadPlans() {
  const view = state.view;
  if (!needCompany("#plans-error")) return;
  const [agents, teams, budgets, users, keys, models] = await Promise.all([
    allPages(companyPath("agents"), {}, "agents"), allPages(companyPath("teams"), {}, "teams"),
    allPages(companyPath("budgets"), {}, "budgets"),
    allPages("/v1/admin/users", {company_id: state.companyId}, "users"),
    allPages("/v1/admin/api-keys", {company_id: state.companyId}, "keys"),
    api("GET", "/v1/models"),
  ]);
  if (superseded(view)) return;
  const sections = {agents, teams, budgets};
  for (const [name, result] of Object.entries(sections)) section(name, result);
  const wanted = [agents, teams, budgets, users, keys, models].filter((r) => !missingRoute(r));
  if (failedLoad("plans", "#plans-error", wanted)) {
    state.plan = null;
    return;
  }
  partial("#agents", agents, (n) => `Showing the first ${n} agents`);
  partial("#teams", teams, (n) => `Showing the first ${n} teams`);
  partial("#budgets", budgets, (n) => `Showing the first ${n} budgets`);
  partial("#plans-error", users, (n) => `The members and budget pickers list the first ${n} users`);
  partial("#plans-error", keys, (n) => `The budget picker lists the first ${n} API keys`);
  state.plan = {
    users: users.data.items,
    keys: keys.data.items.filter((k) => !k.revoked_at),
    teams: teams.ok ? itemsOf(teams.data) : [],
  };
  $("#agent-model").replaceChildren(el("option", {value: ""}, "(the company's default)"),
    ...models.data.models.map((m) => el("option", {value: m.id}, m.id)));
  $("#team-users").replaceChildren(...state.plan.users.map((u) => el("option", {value: u.id}, u.email)));
  fillBudgetTargets();
  if (section("agents", agents)) {
    $("#agents tbody").replaceChildren(...orNone(itemsOf(agents.data).map((a) => el("tr", {},
      td(a.name), td(a.model), td(a.max_tokens == null ? null : String(a.max_tokens)),
      el("td", {}, el("button", {type: "button", class: "danger", "aria-label": `Delete agent ${a.name}`,
        onclick: () => removePlan(`agents/${encodeURIComponent(a.name)}`, `agent ${a.name}`)}, "Delete")))), 4));
  }
  if (section("teams", teams)) {
    const emails = Object.fromEntries(state.plan.users.map((u) => [u.id, u.email]));
    $("#teams tbody").replaceChildren(...orNone(state.plan.teams.map((t) => el("tr", {},
      td(t.name), td((t.user_ids || []).map((id) => emails[id] || id).join(", ")),
      el("td", {}, el("button", {type: "button", class: "danger", "aria-label": `Delete team ${t.name}`,
        onclick: () => removePlan(`teams/${encodeURIComponent(t.id)}`, `team ${t.name}`)}, "Delete")))), 3));
  }
  if (section("budgets", budgets)) {
    const targetName = targetNames();
    $("#budgets tbody").replaceChildren(...orNone(itemsOf(budgets.data).map((b) => el("tr", {},
      td(`${b.scope} ${targetName(b.scope, b.target_id)}`), td(b.amount, "num"), td(b.period),
      el("td", {}, el("button", {type: "button", class: "danger", "aria-label": `Delete budget ${b.id}`,
        onclick: () => removePlan(`budgets/${encodeURIComponent(b.id)}`, "this budget")}, "Delete")))), 4));
  }
}

function itemsOf(data) { return Array.isArray(data) ? data : (data.items || []); }

function targetsFor(scope) {
  const plan = state.plan || {users: [], keys: [], teams: []};
  if (scope === "user") return plan.users.map((u) => [u.id, u.email]);
  if (scope === "api_key") return plan.keys.map((k) => [k.id, `${k.prefix}…`]);
  return plan.teams.map((t) => [t.id, t.name]);
}

function targetNames() {
  // Looked up once per drawing: a search per budget was budgets x users (1.1 s for
  // 4,000 of each, 3.4 s for 8,000, measured).
  const names = {};
  for (const scope of ["user", "api_key", "team"]) names[scope] = new Map(targetsFor(scope));
  return (scope, id) => (Object.hasOwn(names, scope) && names[scope].get(id)) || id;
}

function fillBudgetTargets() {
  $("#budget-target").replaceChildren(...targetsFor($("#budget-scope").value)
    .map(([value, name]) => el("option", {value}, name)));
}

async function createPlan(event, rest, body, errorId, form) {
  event.preventDefault();
  const result = await api("POST", companyPath(rest), body);
  if (!showError(errorId, result)) return;
  $(form).reset();
  await loadPlans();
}

function createAgent(event) {
  const body = {name: $("#agent-name").value.trim()};
  if ($("#agent-model").value) body.model = $("#agent-model").value;
  if ($("#agent-prompt").value.trim()) body.system_prompt = $("#agent-prompt").value;
  if ($("#agent-max-tokens").value) body.max_tokens = Number($("#agent-max-tokens").value);
  return createPlan(event, "agents", body, "#agent-error", "#agent-form");
}

function createTeam(event) {
  const user_ids = [...$("#team-users").selectedOptions].map((o) => o.value);
  return createPlan(event, "teams", {name: $("#team-name").value.trim(), user_ids},
    "#team-error", "#team-form");
}

function createBudget(event) {
  return createPlan(event, "budgets", {scope: $("#budget-scope").value,
    target_id: $("#budget-target").value, amount: $("#budget-amount").value.trim(),
    period: $("#budget-period").value}, "#budget-error", "#budget-form");
}

async function removePlan(rest, what) {
  if (!confirm(`Delete ${what}?`)) return;
  const result = await api("DELETE", companyPath(rest));
  if (showError("#plans-error", result)) await loadPlans();
}

// --- audit -------------------------------------------------------------------------------

async function loadAudit(more) {
  const view = state.view;
  // "More" continues the listing on screen with its own filters, whatever the form
  // says since: a cursor is a position in one listing, and rows of another appended
  // under it would read as one list.
  const params = more ? {...state.auditParams, cursor: state.auditCursor} : {...companyParam(),
    kind: $("#audit-kind").value, actor: $("#audit-actor").value.trim(),
    target: $("#audit-target").value.trim(), from: $("#audit-from").value, to: $("#audit-to").value,
    reservation_id: state.auditReservation, limit: PAGING.more};
  if (!more) state.auditParams = params;
  $("#audit-scope").textContent = state.auditReservation
    ? `Showing reservation ${state.auditReservation}; filter to see everything.` : "";
  const result = await api("GET", `/v1/admin/audit${query(params)}`);
  if (superseded(view)) return;
  if (!showError("#audit-error", result)) {
    // A failed first page shows nothing; a failed "More" keeps the rows so far and
    // its button, to try again.
    if (!more) clearPanel("audit");
    return;
  }
  fillAudit(result.data.items, more);
  state.auditCursor = result.data.next_cursor;
  $("#audit-more").hidden = !result.data.next_cursor;
}

function fillAudit(items, append) {
  const rows = items.map((e) => el("tr", {dataset: {kind: e.kind}},
    td(when(e.created_at)), td(e.kind), td(e.actor), td(e.target), td(e.amount, "num"),
    td(e.request_id), el("td", {}, el("pre", {}, JSON.stringify(e.details, null, 1)))));
  if (append) $("#audit tbody").append(...rows);
  else $("#audit tbody").replaceChildren(...rows);
}

// --- wiring ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#token-form").addEventListener("submit", useToken);
  $("#sign-out").addEventListener("click", signOut);
  for (const button of document.querySelectorAll(".tab")) {
    button.addEventListener("click", () => {
      state.auditReservation = null;  // the nav shows the whole audit again
      openTab(button.dataset.tab);
    });
  }
  $("#company").addEventListener("change", async () => {
    if ($("#company").value === MORE_COMPANIES) {
      state.pages.companies = (state.pages.companies || PAGING.pages) + PAGING.pages;
      await loadCompanyPicker();
      return;
    }
    state.companyId = $("#company").value || null;
    // Another company's lists start at their first pages again.
    state.pages = {companies: state.pages.companies};
    await openTab(currentTab());
  });
  $("#range-form").addEventListener("submit", (e) => { e.preventDefault(); openTab("usage"); });
  $("#invite-form").addEventListener("submit", invite);
  $("#jti-form").addEventListener("submit", revokeStream);
  $("#agent-form").addEventListener("submit", createAgent);
  $("#team-form").addEventListener("submit", createTeam);
  $("#budget-form").addEventListener("submit", createBudget);
  $("#budget-scope").addEventListener("change", fillBudgetTargets);
  $("#key-form").addEventListener("submit", createKey);
  $("#provider-form").addEventListener("submit", saveProvider);
  $("#model-form").addEventListener("submit", saveModel);
  $("#audit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.auditReservation = null;
    openTab("audit");
  });
  $("#audit-more").addEventListener("click", () => loadAudit(true));
  $("#ledger-more").addEventListener("click", () => loadCredits(true));
  const params = new URLSearchParams(location.search);
  if (params.has(ENDED)) {
    $("#signin-error").textContent = "Your session ended (it expired or was signed out): sign in again.";
    params.delete(ENDED);
    history.replaceState(null, "", params.size ? `/console?${params}` : "/console");
  }
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) start(saved);
});
