// Tasker's benchmark workers written in another language: Node.js with @grpc/grpc-js, the
// client most services not written in Rust would use. `tasker bench --clients node,node-eager`
// spawns it with the same spec (JSON) and the same protocol as its Rust `bench-worker`: it
// prints `window-start` and `window-end` when the measurement window opens and closes, then
// one line of JSON (the WorkerReport: next_step_ms, steps_in_window, steps_total, ...).
//
// Chains only: C chains of L steps at once, one worker per chain, a finished chain replaced by
// a new one. Each worker long-polls FetchSteps (max_steps 1), then calls CompleteStep; with
// `eager` it asks for its next step in the same call (CompleteStepRequest.next), creates each
// chain asking for its first step (CreateTaskRequest.next, eager start), and fetches only when
// none came back; with `stream` (eager too) every call is a message on one
// WorkerService/Work stream per worker instead of a call of its own. "Next step starts" is
// measured as in Rust: from sending the CompleteStep of a step to holding its successor.
//
//   cd scripts/peer && npm install
//   node tasker-chains.mjs PROTO_DIR SPEC_JSON
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [protoDir, specJson] = process.argv.slice(2);
if (!protoDir || !specJson) {
  console.error("usage: node tasker-chains.mjs PROTO_DIR SPEC_JSON");
  process.exit(64);
}
const spec = JSON.parse(specJson);
if (!spec.shape.chains) {
  console.error("the Node.js worker runs chains only");
  process.exit(64);
}
const { count, length } = spec.shape.chains;
const eager = Boolean(spec.eager);
const overStream = Boolean(spec.stream);

const definition = protoLoader.loadSync(["tasker/v1/tasks.proto", "tasker/v1/workers.proto"], {
  includeDirs: [protoDir],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: false,
});
const v1 = grpc.loadPackageDefinition(definition).tasker.v1;

const now = () => Number(process.hrtime.bigint()) / 1e6;
const started = now();
const windowStart = started + spec.warmup_ms;
const windowEnd = windowStart + spec.window_ms;
const inWindow = (t) => t >= windowStart && t <= windowEnd;

const report = {
  next_step_ms: [],
  fan_out_ms: [],
  fan_in_ms: [],
  steps_in_window: 0,
  steps_total: 0,
  window_secs: spec.window_ms / 1000,
};
let stopping = false;
const inFlight = new Set();

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const c = client[method](request, (err, response) => {
      inFlight.delete(c);
      if (err) reject(err);
      else resolve(response);
    });
    inFlight.add(c);
  });
}

// One Work stream: each call a WorkRequest with an id, its answer the WorkResponse with that
// id (its response, or `error`, the status the call would have failed with).
function workStream(client) {
  const stream = client.Work();
  inFlight.add(stream);
  const waiting = new Map();
  let nextId = 1;
  let ended = null;
  const fail = (e) => {
    ended = e;
    for (const w of waiting.values()) w.reject(e);
    waiting.clear();
  };
  stream.on("data", (answer) => {
    const w = waiting.get(answer.id);
    if (!w) return;
    waiting.delete(answer.id);
    if (answer.error) {
      const e = new Error(`${answer.error.code} ${answer.error.message}`);
      e.code = answer.error.code;
      w.reject(e);
    } else w.resolve(answer[w.method]);
  });
  stream.on("error", (e) => fail(e));
  stream.on("end", () => fail(new Error("the Work stream ended")));
  return (method, request) =>
    new Promise((resolve, reject) => {
      if (ended) return reject(ended);
      const id = nextId++;
      waiting.set(id, { method, resolve, reject });
      stream.write({ id, [method]: request });
    });
}

const chainSteps = Array.from({ length }, (_, i) => ({
  name: `s${i}`,
  depends_on: i === 0 ? [] : [`s${i - 1}`],
}));

async function chainWorker(i) {
  const address = spec.endpoints[i % spec.endpoints.length].replace(/^https?:\/\//, "");
  const credentials = grpc.credentials.createInsecure();
  const tasks = new v1.TaskService(address, credentials);
  const workers = new v1.WorkerService(address, credentials);
  const namespace = `${spec.namespace}-${i}`;
  const workerId = `bench-node-${namespace}`;
  const last = `s${length - 1}`;
  const work = overStream
    ? workStream(workers)
    : (method, request) =>
        call(workers, method === "fetch_steps" ? "FetchSteps" : "CompleteStep", request);
  // with `eager`, the chain's first step is leased to this worker by its CreateTask (eager
  // start: CreateTaskRequest.next), else fetched
  const createChain = async () => {
    const request = { namespace, name: `chain-${length}`, steps: chainSteps };
    if (eager) Object.assign(request, { next: { max_steps: 1, lease_seconds: 30 }, worker_id: workerId });
    const r = await call(tasks, "CreateTask", request);
    return r.next_steps && r.next_steps.length > 0 ? r.next_steps[0] : null;
  };
  let step = await createChain();
  let sent = null; // when the CompleteStep of this chain's previous step was sent
  while (!stopping) {
    if (step === null) {
      const r = await work("fetch_steps", {
        namespace,
        worker_id: workerId,
        max_steps: 1,
        wait_ms: 10000,
        lease_seconds: 30,
      });
      if (!r.steps || r.steps.length === 0) continue;
      step = r.steps[0];
    }
    const received = now();
    if (sent !== null && inWindow(sent) && inWindow(received)) {
      report.next_step_ms.push(received - sent);
    }
    const send = now();
    const request = {
      step_uuid: step.step_uuid,
      attempt: step.attempt,
      results: { fields: { ok: { bool_value: true } } },
      lease_token: step.lease_token,
    };
    if (eager) request.next = { max_steps: 1, lease_seconds: 30 };
    const r = await work("complete_step", request);
    const done = now();
    report.steps_total += 1;
    if (inWindow(done)) report.steps_in_window += 1;
    sent = send;
    const finished = step.name === last;
    step = eager && r.next_steps && r.next_steps.length > 0 ? r.next_steps[0] : null;
    if (finished) {
      sent = null;
      if (!stopping) step = await createChain();
    }
  }
}

const sleepUntil = (t) => new Promise((r) => setTimeout(r, Math.max(0, t - now())));
const workers = Array.from({ length: count }, (_, i) =>
  chainWorker(i).catch((e) => {
    if (!stopping) throw e;
  }),
);
const failed = Promise.all(workers).then(
  () => null,
  (e) => e,
);
const ended = await Promise.race([
  (async () => {
    await sleepUntil(windowStart);
    console.log("window-start");
    await sleepUntil(windowEnd);
    console.log("window-end");
    return null;
  })(),
  failed.then((e) => e ?? new Error("a worker stopped before the window ended")),
]);
if (ended) {
  console.error(`tasker-chains: ${ended.stack ?? ended}`);
  process.exit(1);
}
stopping = true;
for (const c of inFlight) c.cancel(); // calls and Work streams
await Promise.allSettled(workers);
// a pipe takes stdout asynchronously: exit once the report is written, not before
process.stdout.write(JSON.stringify(report) + "\n", () => process.exit(0));
