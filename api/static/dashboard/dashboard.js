// The fedloom operator dashboard: experiments, a live experiment over /ws/events, plots, clients,
// start and stop. Built on the JavaScript client (fedloom-client.js, a copy of clients/js/src/index.js).
import { FLAPIClient, FLAPIError } from './fedloom-client.js';
import uPlot from './vendor/uPlot.esm.js';

const KEY_STORE = 'fedloom_api_key';
// Events trigger a refresh from the REST API at most every `refresh_s` seconds (fragment option, default
// 5): about six requests each, plus each client's reliability once a minute, against the key's rate limit.
const DEFAULT_REFRESH_S = 5;
const RELIABILITY_TTL_MS = 60_000;
const MAX_EVENT_LINES = 200;
const MAX_CLIENT_ROWS = 100;
// Whole rounds only on the x axis.
const ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
const COLOURS = ['#2f6fdb', '#e67e22', '#1e8e5a', '#c0392b', '#8e44ad', '#16a085', '#7f8c8d', '#d4ac0d'];

// What the page shows, readable by tests and the browser console as window.__fedloomDashboard.
const state = {
  experimentId: null,
  followLatest: true,
  experiment: null,
  experiments: [],
  clients: [],
  selection: null,
  plotted: {},
  eventsReceived: 0,
  lastEventId: null,
  connected: false,
  refreshes: 0,
  shown: null,
};
window.__fedloomDashboard = state;

let api = null;
const charts = {};
let refreshTimer = null;
let refreshEveryMs = DEFAULT_REFRESH_S * 1000;
let lastRefreshAt = 0;
let notBefore = 0; // after a 429: not before Retry-After has passed
const reliability = new Map(); // client id -> {value, at}
let reliabilityStatus = null;

const $ = (selector) => document.querySelector(selector);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return '-';
  return typeof value === 'number' ? Number(value.toFixed(digits)).toString() : String(value);
}

function row(cells) {
  const tr = el('tr');
  for (const cell of cells) tr.append(cell instanceof Node ? cell : el('td', cell));
  return tr;
}

function showError(where, error) {
  const text = error instanceof FLAPIError ? `${error.code}: ${error.message}${error.details ? ` (${error.details})` : ''}` : String(error);
  where.textContent = text;
  where.className = 'error';
}

// The key: from the URL fragment (then removed from the address bar), else this tab's storage, else asked for.

function keyFromFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ''));
  const every = Number(params.get('refresh_s'));
  if (every >= 1) refreshEveryMs = every * 1000;
  const key = params.get('api_key');
  if (key) history.replaceState(null, '', location.pathname + location.search);
  return key;
}

async function open(key) {
  const candidate = new FLAPIClient(location.origin, key);
  try {
    await candidate.listExperiments({ limit: 1 });
  } catch (error) {
    sessionStorage.removeItem(KEY_STORE);
    $('#login').hidden = false;
    $('#main').hidden = true;
    showError($('#login-error'), error);
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  api = candidate;
  $('#login').hidden = true;
  $('#main').hidden = false;
  $('#forget-key').hidden = false;
  connect();
  await refresh().catch((error) => showError($('#form-result'), error));
}

// The event stream: live only (the REST calls give the history); resumed after drops.

function setConnection(connected) {
  state.connected = connected;
  const pill = $('#connection');
  pill.textContent = connected ? 'live' : 'offline';
  pill.dataset.state = connected ? 'live' : 'offline';
}

function connect() {
  api.connectWebSocket({
    resume: true,
    onEvent: onEvent,
    onOpen: () => setConnection(true),
    onClose: (event) => {
      setConnection(false);
      if (event.code === 4401) showError($('#form-result'), 'the event stream refused the key (4401)');
    },
  });
}

function onEvent(event) {
  state.eventsReceived += 1;
  state.lastEventId = event.event_id;
  if (event.type === 'training_started' && state.followLatest) state.experimentId = event.experiment_id;
  if (event.experiment_id && event.experiment_id === state.experimentId) addEventLine(event);
  if (['training_started', 'round_started', 'round_completed', 'training_completed', 'training_stopped',
    'training_failed', 'experiment_created', 'client_registered', 'update_rejected'].includes(event.type)) {
    scheduleRefresh();
  }
}

function describe(event) {
  switch (event.type) {
    case 'round_started':
      return `round ${event.round} started: selected ${(event.selected_clients || []).join(', ')}`;
    case 'client_update':
      return `round ${event.round}: update from ${event.client_id} (local accuracy ${fmt(event.metrics?.local_accuracy)})`;
    case 'update_rejected':
      return `round ${event.round}: update from ${event.client_id} rejected: ${event.reason}`;
    case 'evaluation_started':
      return `round ${event.round}: federated evaluation started`;
    case 'round_completed':
      return `round ${event.round} completed: accuracy ${fmt(event.global_metrics?.accuracy)}, ${event.participating_clients} clients, ${fmt(event.round_duration, 2)} s`;
    case 'training_started':
      return `training started: ${event.total_rounds} rounds`;
    case 'training_progress':
      return null;
    default:
      return `${event.type}${event.reason ? `: ${event.reason}` : ''}`;
  }
}

function addEventLine(event) {
  const text = describe(event);
  if (!text) return;
  const list = $('#events');
  const time = (event.timestamp || '').slice(11, 19);
  list.prepend(el('li', `${time} ${text}`, event.type === 'update_rejected' ? 'rejected' : undefined));
  while (list.children.length > MAX_EVENT_LINES) list.lastChild.remove();
}

function scheduleRefresh() {
  if (refreshTimer) return;
  const wait = Math.max(300, lastRefreshAt + refreshEveryMs - Date.now(), notBefore - Date.now());
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh().catch((error) => {
      if (error instanceof FLAPIError && error.status === 429) {
        notBefore = Date.now() + (error.retryAfter ?? 10) * 1000;
        scheduleRefresh();
      }
      showError($('#form-result'), error);
    });
  }, wait);
}

// Loading and drawing.

async function refresh() {
  lastRefreshAt = Date.now();
  const list = await api.listExperiments({ limit: 50 });
  state.experiments = list.experiments;
  if (!state.experimentId || !list.experiments.some((e) => e.experiment_id === state.experimentId)) {
    const running = list.experiments.find((e) => e.status === 'running');
    state.experimentId = (running || list.experiments[0] || {}).experiment_id ?? null;
  }
  if (state.experimentId) {
    await loadExperiment(state.experimentId);
    // The detail was read after the list: its status and progress are the newer ones.
    const listed = state.experiments.find((e) => e.experiment_id === state.experiment?.experiment_id);
    if (listed) Object.assign(listed, { status: state.experiment.status, progress: state.experiment.progress });
  }
  drawExperiments();
  // Reliability moves with completed rounds: fetched again once a minute and whenever the status changes.
  const status = `${state.experiment?.experiment_id}:${state.experiment?.status}`;
  if (status !== reliabilityStatus) reliability.clear();
  reliabilityStatus = status;
  await loadClients();
  // Everything on the page is from this refresh now.
  state.shown = { experimentId: state.experimentId, status: state.experiment?.status ?? null };
  state.refreshes += 1;
  document.body.dataset.refreshes = String(state.refreshes);
}

function drawExperiments() {
  const body = $('#experiments tbody');
  body.replaceChildren();
  for (const exp of state.experiments) {
    const tr = row([exp.experiment_id, exp.name ?? '', exp.status, `${Math.round((exp.progress ?? 0) * 100)}%`, exp.created_at ?? '']);
    tr.dataset.experimentId = exp.experiment_id;
    if (exp.experiment_id === state.experimentId) tr.className = 'current';
    tr.addEventListener('click', () => {
      state.experimentId = exp.experiment_id;
      state.followLatest = false;
      $('#events').replaceChildren();
      refresh().catch((error) => showError($('#form-result'), error));
    });
    body.append(tr);
  }
}

async function loadExperiment(id) {
  const [experiment, metrics, scores, selection] = await Promise.all([
    api.getExperiment(id),
    api.getTrainingMetrics(id).catch(() => ({ rounds: [] })),
    api.request('GET', '/metrics/scores', { query: { experiment_id: id } }).catch(() => ({ scores: [] })),
    api.selectClients({ experimentId: id }).catch(() => null),
  ]);
  if (id !== state.experimentId) return;
  state.experiment = experiment;
  state.selection = selection;
  $('#experiment-panel').hidden = false;
  $('#experiment-id').textContent = experiment.experiment_id;
  const status = $('#experiment-status');
  status.textContent = experiment.status;
  status.dataset.state = experiment.status;
  $('#progress-bar').style.width = `${Math.round((experiment.progress ?? 0) * 100)}%`;
  $('#progress-text').textContent =
    `${experiment.rounds_completed} of ${experiment.total_rounds} rounds completed` +
    (experiment.status === 'running' ? `, round ${experiment.current_round} in progress` : '') +
    (experiment.stop_reason ? ` - ${experiment.stop_reason}` : '');
  drawSelection(selection);
  drawCharts(metrics.rounds || [], scores.scores || []);
}

function drawSelection(selection) {
  const body = $('#selection tbody');
  body.replaceChildren();
  $('#selection-round').textContent = selection ? `${selection.round}${selection.dry_run ? ' (next, dry run)' : ''}` : '-';
  if (!selection) return;
  const selected = new Set(selection.selected_clients);
  const ids = [...new Set([...selection.selected_clients, ...selection.excluded_clients])].sort();
  for (const id of ids) {
    const reason = selection.exclusion_reasons?.[id] ?? '';
    const trust = selection.policy_results?.[id]?.trust_score;
    const tr = row([id, selected.has(id) ? 'yes' : 'no', fmt(trust, 3)]);
    tr.append(el('td', reason, 'reason'));
    body.append(tr);
  }
}

function perClient(scores, field, rounds) {
  const ids = [...new Set(scores.map((s) => s.client_id))].sort();
  const index = new Map(rounds.map((r, i) => [r, i]));
  const series = Object.fromEntries(ids.map((id) => [id, rounds.map(() => null)]));
  for (const s of scores) {
    if (index.has(s.round)) series[s.client_id][index.get(s.round)] = s[field];
  }
  return series;
}

function drawCharts(rounds, scores) {
  const x = rounds.map((r) => r.round);
  const central = (key) => rounds.map((r) => r[`global_${key}`] ?? null);
  const federated = (key) => rounds.map((r) => r.federated_metrics?.[key] ?? null);
  const scoreRounds = [...new Set(scores.map((s) => s.round))].sort((a, b) => a - b);
  plot('accuracy', x, { central: central('accuracy'), federated: federated('accuracy') });
  plot('loss', x, { central: central('loss'), federated: federated('loss') });
  plot('duration', x, { 'round duration': rounds.map((r) => r.round_duration ?? null) });
  plot('trust', scoreRounds, perClient(scores, 'trust_score', scoreRounds));
  plot('contribution', scoreRounds, perClient(scores, 'contribution', scoreRounds));
}

function plot(name, x, named) {
  const labels = Object.keys(named);
  state.plotted[name] = { rounds: x, series: named };
  const container = $(`#chart-${name}`);
  container.dataset.points = String(x.length);
  const data = [x, ...labels.map((label) => named[label])];
  const existing = charts[name];
  if (existing && existing.series.length === labels.length + 1 && labels.every((l, i) => existing.series[i + 1].label === l)) {
    existing.setData(data);
    return;
  }
  if (existing) existing.destroy();
  const width = Math.max(320, container.clientWidth || 420);
  charts[name] = new uPlot(
    {
      width,
      height: 200,
      scales: { x: { time: false } },
      axes: [{ label: 'round', incrs: ROUND_STEPS, values: (_, ticks) => ticks.map((t) => String(t)) }, {}],
      series: [
        { label: 'round' },
        ...labels.map((label, i) => ({ label, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: true, points: { size: 6 } })),
      ],
    },
    data,
    container,
  );
}

async function loadClients() {
  const list = await api.listClients();
  const clients = list.clients.slice(0, MAX_CLIENT_ROWS);
  const now = Date.now();
  const stale = clients.filter((c) => !(now - (reliability.get(c.client_id)?.at ?? 0) < RELIABILITY_TTL_MS));
  await Promise.all(
    stale.map(async (c) => {
      const stats = await api.getClientMetrics(c.client_id).catch(() => null);
      reliability.set(c.client_id, { value: stats?.statistics?.reliability_score ?? null, at: now });
    }),
  );
  state.clients = clients.map((c) => ({ ...c, reliability_score: reliability.get(c.client_id)?.value ?? null }));
  const body = $('#clients tbody');
  body.replaceChildren();
  for (const c of state.clients) {
    body.append(row([c.client_id, c.status, fmt(c.reliability_score, 3), c.current_round, fmt(c.trust_score, 3)]));
  }
}

// Forms.

function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}

async function startExperiment(event) {
  event.preventDefault();
  const v = formValues(event.target);
  const body = {
    experiment_config: {
      rounds: Number(v.rounds),
      min_clients: Number(v.min_clients),
      dataset: v.dataset,
      model_architecture: v.model_architecture,
      ...(v.experiment_id && { experiment_id: v.experiment_id }),
    },
    training_config: { local_epochs: Number(v.local_epochs), learning_rate: Number(v.learning_rate) },
    aggregation_config: { strategy: v.strategy },
  };
  const out = $('#form-result');
  try {
    const started = await api.startTraining(body);
    out.textContent = `started ${started.experiment_id}: ${started.total_rounds} rounds`;
    out.className = '';
    state.experimentId = started.experiment_id;
    state.followLatest = true;
    $('#events').replaceChildren();
    await refresh();
  } catch (error) {
    showError(out, error);
  }
}

async function stopExperiment(event) {
  event.preventDefault();
  const out = $('#form-result');
  try {
    const stopped = await api.stopTraining({ experimentId: state.experimentId ?? undefined, reason: formValues(event.target).reason });
    out.textContent = `${stopped.experiment_id ?? 'experiment'}: ${stopped.status}`;
    out.className = '';
    await refresh();
  } catch (error) {
    showError(out, error);
  }
}

$('#key-form').addEventListener('submit', (event) => {
  event.preventDefault();
  open($('#key-input').value.trim());
});
$('#forget-key').addEventListener('click', () => {
  sessionStorage.removeItem(KEY_STORE);
  location.reload();
});
$('#start-form').addEventListener('submit', startExperiment);
$('#stop-form').addEventListener('submit', stopExperiment);

const initialKey = keyFromFragment() || sessionStorage.getItem(KEY_STORE);
if (initialKey) open(initialKey);
else $('#login').hidden = false;
