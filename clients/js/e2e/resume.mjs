// A resumable upload whose connection drops mid-chunk at 90% of the file, against a live server.
// The request body of the chunk that crosses FEDLOOM_CUT_AT is a stream that sends the bytes up to
// that point and then fails, so the connection is torn down mid-request as a real drop would.
// FEDLOOM_TARGET=initial_model uploads FEDLOOM_FILE as FEDLOOM_EXPERIMENT's initial model instead of
// as FEDLOOM_CLIENT's update. Prints {cut, ranges, update} (or {cut, ranges, initial_model}) as JSON.
import { readFileSync } from 'node:fs';
import { FLAPIClient } from '../src/index.js';

const cutAt = Number(process.env.FEDLOOM_CUT_AT);
const ranges = [];
let cut = false;

async function cuttingFetch(url, init) {
  if (init.method === 'PUT') {
    const range = init.headers['Content-Range'];
    ranges.push(range);
    const [first, last] = range.split(' ')[1].split('/')[0].split('-').map(Number);
    if (!cut && last >= cutAt) {
      cut = true;
      const bytes = new Uint8Array(await init.body.arrayBuffer()).slice(0, cutAt - first);
      let sent = false;
      const body = new ReadableStream({
        async pull(controller) {
          if (sent) {
            controller.error(new Error('connection dropped (test)'));
            return;
          }
          sent = true;
          controller.enqueue(bytes);
          await new Promise((done) => setTimeout(done, 500));
        },
      });
      return fetch(url, { ...init, body, duplex: 'half' });
    }
  }
  return fetch(url, init);
}

const client = new FLAPIClient(process.env.FEDLOOM_URL, process.env.FEDLOOM_KEY, { fetch: cuttingFetch });
const file = readFileSync(process.env.FEDLOOM_FILE);
const sleep = (ms) => new Promise((done) => setTimeout(done, Math.min(ms, 200)));
if (process.env.FEDLOOM_TARGET === 'initial_model') {
  const stored = await client.uploadInitialModel(process.env.FEDLOOM_EXPERIMENT, file, { resumable: true, sleep });
  console.log(JSON.stringify({ cut, ranges, initial_model: stored }));
} else {
  const update = await client.uploadModelUpdate(process.env.FEDLOOM_CLIENT, file, { data_samples: 20 }, {
    resumable: true,
    experimentId: process.env.FEDLOOM_EXPERIMENT,
    sleep,
  });
  console.log(JSON.stringify({ cut, ranges, update }));
}
