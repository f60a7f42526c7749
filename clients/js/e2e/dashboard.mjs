// Drives /dashboard in headless Chromium (Debian's, through puppeteer-core) while a run happens; driven
// by tests/clients/test_js_client.py. Prints {"ready": true} once the page is live over the WebSocket (the
// test then starts the run), then one JSON line with what the page showed and plotted.
// Environment: FEDLOOM_URL, FEDLOOM_ADMIN_KEY, FEDLOOM_ROUNDS, FEDLOOM_SHOTS (a directory), CHROMIUM_PATH.
import { join } from 'node:path';

import puppeteer from 'puppeteer-core';

const { FEDLOOM_URL: url, FEDLOOM_ADMIN_KEY: key, FEDLOOM_SHOTS: shots } = process.env;
const rounds = Number(process.env.FEDLOOM_ROUNDS);
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TIMEOUT_MS = 240_000;

const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  defaultViewport: { width: 1400, height: 1000 },
});
const problems = [];
try {
  const page = await browser.newPage();
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(`console: ${message.text()}`);
  });
  page.on('requestfailed', (request) => problems.push(`request failed: ${request.url()}`));
  const requested = [];
  page.on('request', (request) => requested.push(request.url()));

  const response = await page.goto(`${url}/dashboard#api_key=${encodeURIComponent(key)}&refresh_s=1`, { waitUntil: 'load' });
  const csp = response.headers()['content-security-policy'] ?? '';
  await page.waitForFunction(() => window.__fedloomDashboard?.connected && window.__fedloomDashboard.refreshes > 0, {
    timeout: 30_000,
  });
  const addressAfterLoad = page.url();
  process.stdout.write(`${JSON.stringify({ ready: true })}\n`);

  // During the run: the experiment appears and a round is plotted while it is still running.
  // If the run ends before the page refreshed mid-run, `during` stays null; the final state is checked anyway.
  const started = Date.now();
  await page.waitForFunction(
    () => {
      const s = window.__fedloomDashboard;
      const running = s.experiment?.status === 'running' && (s.plotted.accuracy?.rounds.length ?? 0) >= 1;
      return running || ['completed', 'stopped', 'failed'].includes(s.experiment?.status);
    },
    { timeout: TIMEOUT_MS, polling: 100 },
  );
  const during = await page.evaluate(() => {
    const s = window.__fedloomDashboard;
    return s.experiment.status === 'running' ? structuredClone(s.plotted) : null;
  });
  if (during && shots) await page.screenshot({ path: join(shots, 'dashboard-live.png'), fullPage: true });
  const secondsToDuring = (Date.now() - started) / 1000;

  await page.waitForFunction(
    (n) => {
      const s = window.__fedloomDashboard;
      const done = s.shown?.status === 'completed' && s.experiment?.status === 'completed';
      return done && s.plotted.accuracy?.rounds.length === n && s.plotted.trust?.rounds.length === n;
    },
    { timeout: TIMEOUT_MS, polling: 200 },
    rounds,
  );
  const secondsToFinal = (Date.now() - started) / 1000;
  const final = await page.evaluate(() => {
    const s = window.__fedloomDashboard;
    // Coloured pixels on each chart's canvas (axes and grid are grey): the series' lines were drawn.
    const inked = {};
    for (const canvas of document.querySelectorAll('.chart canvas')) {
      const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
      let count = 0;
      for (let i = 0; i < data.length; i += 4) {
        const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
        if (Math.max(r, g, b) - Math.min(r, g, b) > 80) count++;
      }
      inked[canvas.closest('.chart').id] = count;
    }
    const cells = (selector) => [...document.querySelectorAll(`${selector} tbody tr`)].map((tr) => [...tr.cells].map((td) => td.textContent));
    return {
      experimentIdShown: document.querySelector('#experiment-id').textContent,
      statusShown: document.querySelector('#experiment-status').textContent,
      progressText: document.querySelector('#progress-text').textContent,
      plotted: structuredClone(s.plotted),
      inked,
      experiments: cells('#experiments'),
      clients: cells('#clients'),
      selection: cells('#selection'),
      eventLines: [...document.querySelectorAll('#events li')].map((li) => li.textContent),
      eventsReceived: s.eventsReceived,
      connected: s.connected,
    };
  });
  if (shots) await page.screenshot({ path: join(shots, 'dashboard.png'), fullPage: true });

  // The forms call the API and show its error: the run is over (stop) and the one start allowed is used.
  // (Chromium logs each error answer to the console; nothing after this point counts as a problem.)
  const seen = [...problems];
  const submit = async (form) => {
    await page.$eval('#form-result', (node) => { node.textContent = ''; });
    await page.click(`${form} button[type=submit]`);
    await page.waitForFunction(() => document.querySelector('#form-result').textContent.length > 0, { timeout: 10_000 });
    return page.$eval('#form-result', (node) => ({ text: node.textContent, className: node.className }));
  };
  const forms = { stop: await submit('#stop-form'), start: await submit('#start-form') };

  // A fresh tab without the fragment asks for the key, and says why a wrong one fails.
  const context = await browser.createBrowserContext();
  const fresh = await context.newPage();
  await fresh.goto(`${url}/dashboard`, { waitUntil: 'load' });
  await fresh.waitForSelector('#login:not([hidden])', { timeout: 10_000 });
  await fresh.type('#key-input', 'not-a-key');
  await fresh.click('#key-form button');
  await fresh.waitForFunction(() => document.querySelector('#login-error').textContent.length > 0, { timeout: 10_000 });
  const loginError = await fresh.$eval('#login-error', (node) => node.textContent);
  await context.close();

  // What went on the wire: the fragment (#api_key=...) never does.
  const sent = requested.map((u) => u.split('#')[0]);
  const keyInRequests = sent.filter((u) => u.includes(encodeURIComponent(key)) || u.includes(key));
  process.stdout.write(
    `${JSON.stringify({ csp, forms, addressAfterLoad, during, secondsToDuring, secondsToFinal, final, loginError, keyInRequests, requested: [...new Set(sent.map((u) => new URL(u).origin))], problems: seen })}\n`,
  );
} finally {
  await browser.close();
}
