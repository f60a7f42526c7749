// The fedloom FL Framework API client for browsers and Node 18+: REST calls under /api/v1 and the
// /ws/events stream. Plain ESM with no build step; in Node without a global WebSocket it uses `ws`.

const NodeWebSocket =
  globalThis.WebSocket === undefined ? await import('ws').then((m) => m.default ?? m.WebSocket, () => null) : null;

/** Close codes after which a resuming connection does not reconnect (the server refused it). */
const FINAL_CLOSE_CODES = new Set([1000, 4400, 4401, 4429]);

/** An error answer of the API (or a failed request), with the spec's error fields. */
export class FLAPIError extends Error {
  constructor({ status, code, message, details = null, retryAfter = null, body = null, cause } = {}) {
    super(message || code || `HTTP ${status}`, cause === undefined ? undefined : { cause });
    this.name = 'FLAPIError';
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
    this.body = body;
  }
}

/** Seconds from a Retry-After header (a number of seconds or an HTTP date), or null. */
function parseRetryAfter(value) {
  if (value == null || value === '') return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return seconds;
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

/** `?a=1&b=2` from the defined entries of `params`, or ''. */
function queryString(params = {}) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) search.append(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}

/** Uploads of at least this many bytes go through a resumable session by default (64 MiB). */
export const RESUMABLE_THRESHOLD = 64 * 1024 * 1024;
/** Answers after which a resumable upload asks the server's offset and goes on. */
const RETRY_STATUSES = new Set([408, 409, 425, 429, 500, 502, 503, 504]);

/** A Blob for an upload from a Blob, ArrayBuffer or typed array. */
function asBlob(file) {
  if (typeof Blob !== 'undefined' && file instanceof Blob) return file;
  if (file instanceof ArrayBuffer || ArrayBuffer.isView(file)) return new Blob([file]);
  throw new TypeError('model file must be a Blob, an ArrayBuffer or a typed array');
}

export class FLAPIClient {
  /**
   * @param {string} serverUrl the server's root, e.g. http://localhost:8080 (no /api/v1)
   * @param {string|null} apiKey the admin key, a client key or an enrollment token
   * @param {{fetch?: typeof fetch, WebSocket?: any}} [options] replacements for the global fetch and WebSocket
   */
  constructor(serverUrl = 'http://localhost:8080', apiKey = null, options = {}) {
    this.serverUrl = String(serverUrl).replace(/\/+$/, '');
    this.baseUrl = `${this.serverUrl}/api/v1`;
    this.apiKey = apiKey;
    this.headers = { 'Content-Type': 'application/json', ...(apiKey && { Authorization: `Bearer ${apiKey}` }) };
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket ?? NodeWebSocket;
    this.ws = null;
    this.lastEventId = null;
    this.listeners = new Map();
  }

  /** One API call: parsed JSON (or the Response with `raw`); error answers throw FLAPIError. */
  async request(method, path, { query, json, body, headers, raw = false } = {}) {
    const init = { method, headers: { ...this.headers, ...headers } };
    if (json !== undefined) init.body = JSON.stringify(json);
    else if (body !== undefined) {
      init.body = body;
      if (typeof FormData !== 'undefined' && body instanceof FormData) delete init.headers['Content-Type'];
    }
    let response;
    try {
      response = await this.fetch(`${this.baseUrl}${path}${queryString(query)}`, init);
    } catch (cause) {
      throw new FLAPIError({ status: 0, code: 'NETWORK_ERROR', message: `cannot reach ${this.baseUrl}`, cause });
    }
    if (!response.ok) throw await this.errorOf(response);
    if (raw) return response;
    return response.status === 204 ? null : response.json();
  }

  /** The FLAPIError for an error response: the spec's `{error: {code, message, details}}` when present. */
  async errorOf(response) {
    const text = await response.text().catch(() => '');
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    const error = body && typeof body.error === 'object' && body.error !== null ? body.error : {};
    return new FLAPIError({
      status: response.status,
      code: error.code ?? `HTTP_${response.status}`,
      message: error.message ?? (text.slice(0, 200) || response.statusText),
      details: error.details ?? null,
      retryAfter: response.status === 429 ? parseRetryAfter(response.headers.get('retry-after')) : null,
      body,
    });
  }

  // Status and training (the spec's methods first).

  getServerStatus() {
    return this.request('GET', '/status');
  }

  getHealth() {
    return this.request('GET', '/health');
  }

  startTraining(experimentConfig) {
    return this.request('POST', '/training/start', { json: experimentConfig });
  }

  stopTraining({ experimentId, reason = 'stopped by operator' } = {}) {
    return this.request('POST', '/training/stop', { json: { experiment_id: experimentId, reason } });
  }

  getTrainingStatus() {
    return this.request('GET', '/training/status');
  }

  getTrainingMetrics(experimentId, { fromRound, toRound, clientId } = {}) {
    const query = { experiment_id: experimentId, from_round: fromRound, to_round: toRound, client_id: clientId };
    return this.request('GET', '/metrics/training', { query });
  }

  // Clients.

  registerClient(clientId, clientConfig = {}, { capabilities, location } = {}) {
    const json = { client_id: clientId, client_config: clientConfig, capabilities, location };
    return this.request('POST', '/clients/register', { json });
  }

  listClients({ status, round, experimentId } = {}) {
    return this.request('GET', '/clients', { query: { status, round, experiment_id: experimentId } });
  }

  getClient(clientId) {
    return this.request('GET', `/clients/${encodeURIComponent(clientId)}`);
  }

  getClientTask(clientId, { wait } = {}) {
    return this.request('GET', `/clients/${encodeURIComponent(clientId)}/task`, { query: { wait } });
  }

  selectClients({ round, policyCheck = true, experimentId } = {}) {
    const query = { round, policy_check: policyCheck, experiment_id: experimentId };
    return this.request('GET', '/clients/select', { query });
  }

  getClientMetrics(clientId) {
    return this.request('GET', `/metrics/clients/${encodeURIComponent(clientId)}`);
  }

  revokeClient(clientId) {
    return this.request('POST', `/clients/${encodeURIComponent(clientId)}/revoke`);
  }

  rotateClientKey(clientId) {
    return this.request('POST', `/clients/${encodeURIComponent(clientId)}/rotate-key`);
  }

  // Experiments.

  createExperiment(body) {
    return this.request('POST', '/experiments', { json: body });
  }

  listExperiments({ status, limit, offset } = {}) {
    return this.request('GET', '/experiments', { query: { status, limit, offset } });
  }

  getExperiment(experimentId) {
    return this.request('GET', `/experiments/${encodeURIComponent(experimentId)}`);
  }

  continueExperiment(experimentId, rounds) {
    return this.request('POST', `/experiments/${encodeURIComponent(experimentId)}/continue`, { json: { rounds } });
  }

  /**
   * Store an experiment's round-0 weights (a safetensors or torch.save state_dict file). Files of
   * RESUMABLE_THRESHOLD bytes or more (or with `resumable: true`) go through a resumable session
   * (see uploadInitialModelResumable).
   */
  uploadInitialModel(experimentId, file, { resumable, ...options } = {}) {
    const blob = asBlob(file);
    if (resumable ?? blob.size >= RESUMABLE_THRESHOLD) {
      return this.uploadInitialModelResumable(experimentId, blob, options);
    }
    const path = `/experiments/${encodeURIComponent(experimentId)}/initial_model`;
    return this.request('PUT', path, { body: blob, headers: { 'Content-Type': 'application/octet-stream' } });
  }

  /**
   * Upload an experiment's round-0 weights through a resumable session
   * (`/experiments/{id}/initial_model/sessions`), as uploadModelUpdateResumable does an update; answers
   * as `PUT /experiments/{id}/initial_model` does.
   */
  async uploadInitialModelResumable(experimentId, file, options = {}) {
    const base = `/experiments/${encodeURIComponent(experimentId)}/initial_model/sessions`;
    return this.uploadInSession(base, {}, asBlob(file), options);
  }

  /** The committed offset and size of an initial model's resumable upload session. */
  getInitialModelSession(experimentId, uploadId) {
    const base = `/experiments/${encodeURIComponent(experimentId)}/initial_model/sessions`;
    return this.request('GET', `${base}/${encodeURIComponent(uploadId)}`);
  }

  // Models and updates.

  getGlobalModel({ round, format, experimentId } = {}) {
    return this.request('GET', '/model/global', { query: { round, format, experiment_id: experimentId } });
  }

  /** The model file's bytes and its sha256 (from X-Model-SHA256). */
  async downloadModel(modelId, { format } = {}) {
    const response = await this.request('GET', `/model/download/${encodeURIComponent(modelId)}`, {
      query: { format },
      raw: true,
    });
    return { data: new Uint8Array(await response.arrayBuffer()), sha256: response.headers.get('x-model-sha256') };
  }

  /**
   * Upload a trained model with its metrics. Files of RESUMABLE_THRESHOLD bytes or more (or with
   * `resumable: true`) go through a resumable session (see uploadModelUpdateResumable).
   */
  uploadModelUpdate(clientId, file, metrics, { filename = 'update.safetensors', resumable, ...options } = {}) {
    const blob = asBlob(file);
    if (resumable ?? blob.size >= RESUMABLE_THRESHOLD) {
      return this.uploadModelUpdateResumable(clientId, blob, metrics, options);
    }
    return this.request('POST', `/model/update/${encodeURIComponent(clientId)}`, {
      query: { experiment_id: options.experimentId },
      body: this.modelForm(blob, metrics, filename),
    });
  }

  /**
   * Upload through a resumable session: `POST .../sessions`, then `PUT` chunks with `Content-Range`,
   * then `POST .../complete`. A failed chunk (a dropped connection, a 5xx, 408, 409 or 429) is followed
   * by `GET` of the session and the upload goes on from the server's committed offset; it gives up
   * after `maxStalled` attempts in a row that move the offset no further.
   */
  async uploadModelUpdateResumable(clientId, file, metrics, { experimentId, ...options } = {}) {
    const base = `/model/update/${encodeURIComponent(clientId)}/sessions`;
    const opening = { metrics: metrics ?? {}, ...(experimentId ? { experiment_id: experimentId } : {}) };
    return this.uploadInSession(base, opening, asBlob(file), options);
  }

  /** The session loop of both resumable uploads: open at `base` with `opening` and the size, chunks, finish. */
  async uploadInSession(
    base,
    opening,
    blob,
    { chunkSize, maxStalled = 6, onProgress, sleep = (ms) => new Promise((done) => setTimeout(done, ms)) } = {},
  ) {
    const opened = await this.request('POST', base, { json: { size: blob.size, ...opening } });
    const url = `${base}/${encodeURIComponent(opened.upload_id)}`;
    const chunk = Math.min(chunkSize ?? opened.chunk_max_bytes, opened.chunk_max_bytes);
    let offset = 0;
    let stalled = 0;
    while (offset < blob.size) {
      const end = Math.min(offset + chunk, blob.size);
      let next;
      try {
        const answer = await this.request('PUT', url, {
          body: blob.slice(offset, end),
          headers: { 'Content-Type': 'application/octet-stream', 'Content-Range': `bytes ${offset}-${end - 1}/${blob.size}` },
        });
        next = answer.offset;
      } catch (error) {
        if (!(error instanceof FLAPIError) || !(error.status === 0 || RETRY_STATUSES.has(error.status))) throw error;
        stalled += 1;
        if (stalled >= maxStalled) throw error;
        await sleep(1000 * (error.retryAfter ?? Math.min(0.5 * 2 ** stalled, 30)));
        next = (await this.request('GET', url)).offset;
        if (next > offset) stalled = 0;
        offset = next;
        continue;
      }
      stalled = 0;
      offset = next;
      if (onProgress) onProgress({ offset, size: blob.size });
    }
    return this.request('POST', `${url}/complete`);
  }

  /** The committed offset and size of a resumable upload session. */
  getUploadSession(clientId, uploadId) {
    return this.request('GET', `/model/update/${encodeURIComponent(clientId)}/sessions/${encodeURIComponent(uploadId)}`);
  }

  getUpdate(updateId) {
    return this.request('GET', `/model/update/${encodeURIComponent(updateId)}`);
  }

  validateModel(clientId, file, metrics, { filename = 'update.safetensors' } = {}) {
    return this.request('POST', `/model/validate/${encodeURIComponent(clientId)}`, {
      body: this.modelForm(file, metrics, filename),
    });
  }

  submitEvaluation(clientId, report) {
    return this.request('POST', `/model/evaluation/${encodeURIComponent(clientId)}`, { json: report });
  }

  modelForm(file, metrics, filename) {
    const form = new FormData();
    form.append('model_file', asBlob(file), filename);
    form.append('metrics', JSON.stringify(metrics ?? {}));
    return form;
  }

  // The event stream.

  /**
   * Open `WS /ws/events`. With `since`, first replay every event after that id. The key goes in the
   * Authorization header where the WebSocket allows headers (`ws` in Node), else in `?api_key=`
   * (browsers). `resume` reconnects after a drop or a 1013 close from the last event id received;
   * `onOpen` and `onClose` are called for every connection it opens.
   */
  connectWebSocket({ since, onEvent, onOpen, onClose, resume = false, resumeDelayMs = 1000 } = {}) {
    const Impl = this.WebSocket;
    if (!Impl) throw new Error('no WebSocket implementation: install the "ws" package or pass options.WebSocket');
    const url = new URL(`${this.serverUrl.replace(/^http/, 'ws')}/ws/events`);
    if (since !== undefined && since !== null) url.searchParams.set('since', String(since));
    const usesHeaders = Impl === NodeWebSocket && NodeWebSocket !== null;
    if (this.apiKey && !usesHeaders) url.searchParams.set('api_key', this.apiKey);
    const ws = usesHeaders
      ? new Impl(url.toString(), { headers: this.apiKey ? { Authorization: `Bearer ${this.apiKey}` } : {} })
      : new Impl(url.toString());
    this.ws = ws;
    ws.onopen = () => {
      if (onOpen) onOpen(ws);
    };
    ws.onmessage = (message) => {
      const data = JSON.parse(typeof message.data === 'string' ? message.data : String(message.data));
      if (typeof data.event_id === 'number') this.lastEventId = data.event_id;
      this.handleEvent(data);
      if (onEvent) onEvent(data);
    };
    ws.onclose = (event) => {
      if (onClose) onClose(event);
      if (resume && this.ws === ws && !FINAL_CLOSE_CODES.has(event.code)) {
        setTimeout(() => {
          if (this.ws === ws) {
            this.connectWebSocket({ since: this.lastEventId ?? since, onEvent, onOpen, onClose, resume, resumeDelayMs });
          }
        }, resumeDelayMs);
      }
    };
    return ws;
  }

  /** Close the event stream (no resume). */
  closeWebSocket() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, 'client closed');
  }

  /** Subscribe `listener` to events of `type` (`'*'` for all); returns a function that unsubscribes. */
  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.listeners.get(type)?.delete(listener);
  }

  /** Called with each event received; hands it to the listeners of its type and of `'*'`. */
  handleEvent(event) {
    for (const key of [event.type, '*']) {
      for (const listener of this.listeners.get(key) ?? []) listener(event);
    }
  }
}

export default FLAPIClient;
