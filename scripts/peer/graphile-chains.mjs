// Same-run peer for `tasker bench`: C chains of L no-op jobs on graphile-worker, where each
// job adds the next job of its chain, so that "next step starts" means the same thing as in
// Tasker's table: from the moment the worker asks for the successor (addJob) to the moment a
// worker holds it. Usage (not part of CI):
//   cd scripts/peer && npm install
//   node graphile-chains.mjs postgres://postgres@127.0.0.1:5432/peer 8 10 6
// (database URL, chains, steps per chain, seconds). The database is emptied of its
// graphile_worker schema first. Prints one line per run: steps/s, p50/p95/p99 in ms, and the
// machine's CPU per step from /proc/stat (all processes, like Tasker's "machine" column).
import { Logger, run, quickAddJob } from "graphile-worker";
import pg from "pg";
import { readFileSync } from "node:fs";

const [url, chainsArg = "1", lengthArg = "10", secondsArg = "6"] = process.argv.slice(2);
if (!url) {
  console.error("usage: node graphile-chains.mjs DATABASE_URL CHAINS STEPS SECONDS");
  process.exit(64);
}
const chains = Number(chainsArg);
const length = Number(lengthArg);
const seconds = Number(secondsArg);

const now = () => Number(process.hrtime.bigint()) / 1e6;
const cpuTicks = () => {
  const fields = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1);
  const [user, nice, system, , , irq, softirq, steal] = fields.map(Number);
  return user + nice + system + irq + softirq + steal;
};

const client = new pg.Client({ connectionString: url });
await client.connect();
await client.query("DROP SCHEMA IF EXISTS graphile_worker CASCADE");
await client.end();

const latencies = [];
let steps = 0;
let measuring = false;
let stopping = false;

const taskList = {
  step: async (payload, helpers) => {
    if (payload.sent !== undefined && measuring) latencies.push(now() - payload.sent);
    if (measuring) steps += 1;
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

await new Promise((r) => setTimeout(r, 1000)); // warm-up
measuring = true;
const cpu0 = cpuTicks();
const t0 = now();
await new Promise((r) => setTimeout(r, seconds * 1000));
measuring = false;
const elapsed = (now() - t0) / 1000;
const cpu1 = cpuTicks();
stopping = true;
await runner.stop();

latencies.sort((a, b) => a - b);
const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))] ?? NaN;
const ticksPerSecond = 100;
const cpuMsPerStep = (((cpu1 - cpu0) / ticksPerSecond) * 1000) / Math.max(steps, 1);
console.log(
  `graphile-worker chains ${chains} x ${length}: ${(steps / elapsed).toFixed(0)} jobs/s, ` +
    `next step p50 ${pct(50).toFixed(2)} p95 ${pct(95).toFixed(2)} p99 ${pct(99).toFixed(2)} ms, ` +
    `machine CPU ${cpuMsPerStep.toFixed(2)} ms/step (${latencies.length} hops)`,
);
