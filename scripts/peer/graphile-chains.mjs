// Same-run peer for `tasker bench --peer`: C chains of L no-op jobs on graphile-worker, where
// each job adds the next job of its chain, so that "next step starts" means the same thing as
// in Tasker's table: from the moment the worker asks for the successor (addJob) to the moment
// a worker holds it. `tasker bench --peer` runs it beside Tasker's workers on the same
// database (its own schema, graphile_worker, dropped first) and speaks to it as to its own
// workers: `window-start` and `window-end` on stdout when the measurement window opens and
// closes (the bench samples CPU between them), then one line of JSON (next_step_ms,
// steps_in_window, steps_total, window_secs). By hand:
//   cd scripts/peer && npm install
//   node graphile-chains.mjs postgres://postgres@127.0.0.1:5432/peer 8 10 1000 6000
// (database URL, chains, steps per chain, warm-up ms, window ms).
import { Logger, run, quickAddJob } from "graphile-worker";
import pg from "pg";

const [url, chainsArg = "1", lengthArg = "10", warmupArg = "1000", windowArg = "6000"] = process.argv.slice(2);
if (!url) {
  console.error("usage: node graphile-chains.mjs DATABASE_URL CHAINS STEPS WARMUP_MS WINDOW_MS");
  process.exit(64);
}
const chains = Number(chainsArg);
const length = Number(lengthArg);
const warmupMs = Number(warmupArg);
const windowMs = Number(windowArg);

const now = () => Number(process.hrtime.bigint()) / 1e6;

const client = new pg.Client({ connectionString: url });
await client.connect();
await client.query("DROP SCHEMA IF EXISTS graphile_worker CASCADE");
await client.end();

const latencies = [];
let steps = 0;
let total = 0;
let measuring = false;
let windowStarted = Infinity;
let stopping = false;

const taskList = {
  step: async (payload, helpers) => {
    // both ends inside the window, as in Tasker's workers
    if (payload.sent !== undefined && measuring && payload.sent >= windowStarted) latencies.push(now() - payload.sent);
    if (measuring) steps += 1;
    total += 1;
    if (stopping) return;
    const next = payload.n + 1 >= length ? { chain: payload.chain, n: 0 } : { ...payload, n: payload.n + 1 };
    // a new chain starts where one ends, as Tasker's bench creates a new task
    await helpers.addJob("step", { ...next, sent: payload.n + 1 >= length ? undefined : now() });
  },
};

const runner = await run({
  connectionString: url,
  concurrency: chains,
  maxPoolSize: chains + 2,
  logger: new Logger(() => () => {}),
  noHandleSignals: true,
  pollInterval: 2000,
  taskList,
});
for (let c = 0; c < chains; c++) await quickAddJob({ connectionString: url, logger: new Logger(() => () => {}) }, "step", { chain: c, n: 0 });

await new Promise((r) => setTimeout(r, warmupMs));
measuring = true;
windowStarted = now();
console.log("window-start");
await new Promise((r) => setTimeout(r, windowMs));
measuring = false;
console.log("window-end");
const stepsInWindow = steps;
// the chains go on until the runner stops: count what completes meanwhile too
stopping = true;
await runner.stop();

// a pipe takes stdout asynchronously: exit once the report is written, not before
process.stdout.write(
  JSON.stringify({
    next_step_ms: latencies,
    fan_out_ms: [],
    fan_in_ms: [],
    steps_in_window: stepsInWindow,
    steps_total: total,
    window_secs: windowMs / 1000,
  }) + "\n",
  () => process.exit(0),
);
