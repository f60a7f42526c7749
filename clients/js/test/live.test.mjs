// The client against a live `fedloom serve` after a finished run (tests/clients/test_js_client.py starts
// both). Environment: FEDLOOM_URL, FEDLOOM_ADMIN_KEY, FEDLOOM_EXPERIMENT, FEDLOOM_ROUNDS, FEDLOOM_CLIENTS.
// The server must allow one training start per window, already used, so a second start is a 429.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';

import { FLAPIClient, FLAPIError } from '@fedloom/client';

const { FEDLOOM_URL: url, FEDLOOM_ADMIN_KEY: key, FEDLOOM_EXPERIMENT: experimentId } = process.env;
const rounds = Number(process.env.FEDLOOM_ROUNDS);
const clients = Number(process.env.FEDLOOM_CLIENTS);
const skip = url ? false : 'FEDLOOM_URL is not set: run through tests/clients/test_js_client.py';

/** Every event of the run from `since: 0` until its training_completed, and how the stream ended. */
function replay(client) {
  return new Promise((resolve, reject) => {
    const events = [];
    const timer = setTimeout(() => reject(new Error(`no training_completed after ${events.length} events`)), 30_000);
    client.on('*', (event) => {
      events.push(event);
      if (event.type === 'training_completed' && event.experiment_id === experimentId) {
        clearTimeout(timer);
        client.closeWebSocket();
        resolve(events);
      }
    });
    const ws = client.connectWebSocket({ since: 0 });
    ws.onerror = (error) => reject(error.error ?? error);
  });
}

test('status and training metrics of the finished run', { skip }, async () => {
  const client = new FLAPIClient(url, key);
  const status = await client.getServerStatus();
  assert.equal(status.experiment_id, experimentId);
  assert.equal(status.status, 'completed');
  assert.equal(status.current_round, rounds);

  const metrics = await client.getTrainingMetrics(experimentId);
  assert.equal(metrics.experiment_id, experimentId);
  assert.deepEqual(metrics.rounds.map((r) => r.round), Array.from({ length: rounds }, (_, i) => i + 1));
  for (const r of metrics.rounds) {
    assert.ok(r.global_accuracy > 0 && r.global_accuracy <= 1, `round ${r.round}: ${r.global_accuracy}`);
    assert.equal(r.participating_clients, clients);
    assert.equal(Object.keys(r.client_metrics).length, clients);
  }
  assert.equal(metrics.summary.total_rounds, rounds);

  const list = await client.listExperiments();
  assert.ok(list.experiments.some((e) => e.experiment_id === experimentId && e.status === 'completed'));
  const detail = await client.getExperiment(experimentId);
  assert.equal(detail.rounds_completed, rounds);
  const registered = await client.listClients();
  assert.equal(registered.total_count, clients);
  const selection = await client.selectClients({ round: 1, experimentId });
  assert.equal(selection.dry_run, false);
  assert.equal(selection.selected_clients.length, clients);
  const model = await client.getGlobalModel({ experimentId });
  assert.equal(model.round, rounds);
  const file = await client.downloadModel(model.model_id);
  assert.equal(file.sha256, model.sha256);
  assert.equal(createHash('sha256').update(file.data).digest('hex'), model.sha256);
});

test('connectWebSocket({since: 0}) replays the run, matching the metrics', { skip }, async () => {
  const client = new FLAPIClient(url, key);
  const events = await replay(client);
  const ids = events.map((e) => e.event_id);
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
  assert.equal(new Set(ids).size, ids.length);
  assert.equal(client.lastEventId, ids.at(-1));

  const mine = events.filter((e) => e.experiment_id === experimentId);
  const completed = mine.filter((e) => e.type === 'round_completed');
  assert.deepEqual(completed.map((e) => e.round), Array.from({ length: rounds }, (_, i) => i + 1));
  const metrics = await client.getTrainingMetrics(experimentId);
  completed.forEach((e, i) => {
    assert.equal(e.global_metrics.accuracy, metrics.rounds[i].global_accuracy);
    assert.equal(e.round_duration, metrics.rounds[i].round_duration);
  });
  assert.equal(mine.filter((e) => e.type === 'round_started').length, rounds);
  assert.equal(mine.filter((e) => e.type === 'client_update').length, rounds * clients);
  assert.equal(events.filter((e) => e.type === 'client_registered').length, clients);
});

test('errors are FLAPIError with the spec fields, Retry-After on 429', { skip }, async () => {
  const stranger = new FLAPIClient(url, `fladmin_${'x'.repeat(43)}`);
  await assert.rejects(stranger.getServerStatus(), (error) => {
    assert.ok(error instanceof FLAPIError);
    assert.equal(error.status, 401);
    assert.equal(error.code, 'UNAUTHORIZED');
    assert.equal(typeof error.message, 'string');
    return true;
  });

  const client = new FLAPIClient(url, key);
  await assert.rejects(client.getExperiment('no_such_experiment'), { name: 'FLAPIError', status: 404, code: 'NOT_FOUND' });
  await assert.rejects(client.listExperiments({ status: 'sideways' }), (error) => {
    assert.equal(error.code, 'INVALID_REQUEST');
    assert.ok(error.details);
    return true;
  });
  await assert.rejects(client.startTraining({ experiment_config: { rounds: 1 } }), (error) => {
    assert.equal(error.status, 429);
    assert.equal(error.code, 'RATE_LIMITED');
    assert.ok(error.retryAfter > 0, `retryAfter ${error.retryAfter}`);
    return true;
  });

  const code = await new Promise((resolve) => {
    stranger.connectWebSocket({ onClose: (event) => resolve(event.code) });
  });
  assert.equal(code, 4401);
});

test('rotateClientKey and revokeClient, seen by a stream that resumed after a drop', { skip }, async () => {
  const admin = new FLAPIClient(url, key);
  const watcher = new FLAPIClient(url, key);
  const ids = [];
  let opened = 0;
  let reopened;
  const again = new Promise((resolve) => {
    reopened = resolve;
  });
  const rotatedSeen = new Promise((resolve) => {
    watcher.on('client_key_rotated', resolve);
  });
  watcher.on('*', (event) => ids.push(event.event_id));
  const first = watcher.connectWebSocket({
    since: 0,
    resume: true,
    resumeDelayMs: 100,
    onOpen: () => {
      opened += 1;
      if (opened === 2) reopened();
    },
  });
  await new Promise((resolve) => watcher.on('training_completed', resolve));
  first.terminate(); // the connection drops without a close frame (1006): the client reconnects
  await again;
  assert.notEqual(watcher.ws, first);

  const rotated = await admin.rotateClientKey('c1');
  const seen = await rotatedSeen;
  assert.equal(seen.client_id, 'c1');
  assert.equal(new Set(ids).size, ids.length, 'an event was delivered twice across the reconnect');
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
  watcher.closeWebSocket();

  const site = new FLAPIClient(url, rotated.api_key);
  assert.equal((await site.getClient('c1')).client_id, 'c1');
  const revoked = await admin.revokeClient('c1');
  assert.equal(revoked.client_id, 'c1');
  assert.equal(revoked.revoked, true);
  assert.equal(revoked.revoked_keys, 1);
  await assert.rejects(site.getClient('c1'), { name: 'FLAPIError', status: 401, code: 'UNAUTHORIZED' });
  await assert.rejects(admin.revokeClient('nobody'), (error) => error.status === 404);
});
