#!/usr/bin/env python3
"""A Tasker worker in Python, on stubs generated from the repository's proto files.

    pip install grpcio grpcio-tools
    python3 examples/python/worker.py --namespace demo               # until interrupted
    python3 examples/python/worker.py --namespace demo --steps 4     # stop after 4 steps
    python3 examples/python/worker.py --namespace shop --queue warehouse   # only those steps

The stubs are generated at start-up with grpcio-tools (`grpc_tools.protoc`) into a temporary
directory, from `proto/` next to this file's repository (or `--proto-dir`): nothing generated
is kept in the repository. With tokens configured, set TASKER_TOKEN.

Each step it leases is "done" by echoing what it was given: its results are
{"step": name, "attempt": n, "inputs": ..., "parents": [parent names]}. A step whose inputs
say {"fail": "<message>"} is failed instead (retryable, 100 ms backoff). Each report carries the
step's lease_token, and each completion asks for the worker's next step in the same call
(CompleteStepRequest.next, eager dispatch): the step it makes ready comes back in next_steps,
and the worker fetches only when none did. When the service refuses a FetchSteps for now (RESOURCE_EXHAUSTED: too many
fetches waiting; UNAVAILABLE: restarting), the worker waits and asks again, longer each time.
"""

import argparse
import importlib
import os
import random
import sys
import tempfile
import time

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_tools import protoc


def load_stubs(proto_dir):
    """Compile the tasker.v1 protos and import the worker service's modules."""
    out = tempfile.mkdtemp(prefix="tasker-stubs-")
    files = [os.path.join("tasker", "v1", f) for f in os.listdir(os.path.join(proto_dir, "tasker", "v1"))]
    # the Work stream's answers carry google.rpc.Status: its file is in proto/ too
    files.append(os.path.join("google", "rpc", "status.proto"))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", *files])
    if code != 0:
        sys.exit(f"compiling the protos in {proto_dir} failed")
    sys.path.insert(0, out)
    return (importlib.import_module("tasker.v1.workers_pb2"),
            importlib.import_module("tasker.v1.workers_pb2_grpc"))


def work(name, attempt, inputs, parents):
    """The work itself: echo the step back, or raise when asked to fail."""
    if isinstance(inputs.get("fail"), str):
        raise RuntimeError(inputs["fail"])
    return {"step": name, "attempt": attempt, "inputs": inputs, "parents": sorted(parents)}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=os.environ.get("TASKER_ENDPOINT", "127.0.0.1:50051"),
                        help="host:port of the service (plaintext)")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--queue", action="append", default=[],
                        help="a queue whose steps it runs (repeatable; none: the default queue)")
    parser.add_argument("--worker-id", default=f"python-worker-{os.getpid()}")
    parser.add_argument("--steps", type=int, help="stop after this many steps")
    parser.add_argument("--proto-dir", default=os.path.join(here, "..", "..", "proto"))
    args = parser.parse_args()

    pb, rpc = load_stubs(os.path.abspath(args.proto_dir))
    endpoint = args.endpoint.removeprefix("http://")
    metadata = []
    if os.environ.get("TASKER_TOKEN"):
        metadata.append(("authorization", f"Bearer {os.environ['TASKER_TOKEN']}"))
    channel = grpc.insecure_channel(endpoint)
    workers = rpc.WorkerServiceStub(channel)
    print(f"{args.worker_id} working namespace {args.namespace!r} at {endpoint}", file=sys.stderr)

    handled = 0
    backoff = 0.1
    handed = []  # steps handed over with a completion's answer, run before fetching again
    while args.steps is None or handled < args.steps:
        if handed:
            step = handed.pop(0)
            # ask for more only while more are wanted: a step handed over and never run would
            # wait for its lease to run out
            more = args.steps is None or handled + 1 < args.steps
            handed.extend(run(pb, workers, metadata, args, step, more))
            handled += 1
            continue
        try:
            reply = workers.FetchSteps(
                pb.FetchStepsRequest(namespace=args.namespace, worker_id=args.worker_id,
                                     max_steps=1, wait_ms=10_000, lease_seconds=30,
                                     queues=args.queue),
                metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            # too many fetches waiting (RESOURCE_EXHAUSTED) or the service restarting
            # (UNAVAILABLE): wait, longer each time, and ask again
            if e.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                raise
            print(f"FetchSteps: {e.code().name}: {e.details()}; retrying in {backoff:.1f} s",
                  file=sys.stderr, flush=True)
            time.sleep(backoff + random.uniform(0, backoff))
            backoff = min(backoff * 2, 10.0)
            continue
        backoff = 0.1
        handed.extend(reply.steps)


def run(pb, workers, metadata, args, step, more):
    """Run one step and report it; with `more`, the completion asks for the next step (one)
    and returns what came back."""
    inputs = json_format.MessageToDict(step.inputs)
    parents = json_format.MessageToDict(step.parent_results)
    try:
        results = struct_pb2.Struct()
        results.update(work(step.name, step.attempt, inputs, parents))
        request = pb.CompleteStepRequest(step_uuid=step.step_uuid, attempt=step.attempt,
                                         lease_token=step.lease_token, results=results)
        if more:
            request.next.CopyFrom(pb.NextSteps(max_steps=1, queues=args.queue, lease_seconds=30))
        reply = workers.CompleteStep(request, metadata=metadata, timeout=30)
        print(f"completed {step.name} (attempt {step.attempt}) of task {step.task_uuid}",
              flush=True)
        return list(reply.next_steps)
    except RuntimeError as failure:
        r = workers.FailStep(pb.FailStepRequest(step_uuid=step.step_uuid, attempt=step.attempt,
                                                lease_token=step.lease_token,
                                                error_message=str(failure), retryable=True,
                                                backoff_ms=100),
                             metadata=metadata, timeout=30)
        print(f"failed {step.name} (attempt {step.attempt}): {failure}; "
              f"{pb.FailStepOutcome.Name(r.outcome)}",
              flush=True)
        return []


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
