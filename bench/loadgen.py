"""The load generator of ``make bench-overload``, run as its own process.

Keeps ``--inflight`` calls to ModelInfer going for ``--seconds`` over
grpc.aio (pre-serialised bytes: the generator's own cost per call is small),
each with a ``--deadline``; a refused call (RESOURCE_EXHAUSTED, UNAVAILABLE)
is retried as the SDK does (the server's ``retry-after-ms`` hint, else
jittered exponential backoff, never past its deadline); ``--no-backoff``
retries at once. ``--light``: one call at a time,
never retried (the light caller; with a short ``--deadline``, the late
caller). ``--nice N`` lowers its CPU priority. How late a 10 ms timer fires
in the generator is reported too: a starved generator reads answers late.
``--model`` names the model (``fast`` unless given).
Prints its figures as one JSON object; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
from typing import NoReturn

import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"
_RETRIED = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # what the SDK retries, with backoff
SIZE = 224


def _payload(model: str) -> bytes:
    from tlserve.contract.codec import encode_request_inputs
    from tlserve.protos import grpc_service_pb2 as pb

    images = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), np.uint8)
    request = pb.ModelInferRequest(model_name=model)
    encode_request_inputs(request, {"images": images})
    return request.SerializeToString()


async def _generate(args: argparse.Namespace) -> NoReturn:
    """Keep ``inflight`` calls going for ``seconds``; count outcomes (runs in its own process)."""
    import grpc

    from tlserve.contract.errors import DeadlineExceeded, Overloaded, from_rpc_error

    payload = _payload(args.model)
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, args.inflight // 500))
    ]
    calls = [ch.unary_unary(METHOD) for ch in channels]  # bytes in, bytes out
    outcomes: dict[str, int] = {}
    details: dict[str, str] = {}  # the first message of each failure code
    latencies: list[float] = []
    refusals: list[float] = []
    late: list[float] = []  # DEADLINE_EXCEEDED: how soon the caller heard it
    # ...of those the server refused as unable to answer in time: from sending,
    # before the server took the call up (the deadline less what it still had
    # then: on the caller's side of the connection), and from then on.
    refused_late: list[float] = []
    before_server: list[float] = []
    after_server: list[float] = []
    unparsed = 0  # refused by the admission, before the message was parsed
    unanswered = 0  # gRPC's own "Deadline Exceeded": nothing answered in time
    answered: list[float] = []  # every outcome's latency: the light caller's view
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + args.seconds

    async def slot(index: int) -> None:
        nonlocal unparsed, unanswered
        call = calls[index % len(calls)]
        while loop.time() < end:
            deadline, attempt = loop.time() + args.deadline, 0
            began = loop.time()
            while True:
                attempt, sent, wait, left, bare = attempt + 1, loop.time(), None, None, False
                try:
                    await call(payload, timeout=max(0.001, deadline - sent))
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                    on_arrival = "(refused unparsed)" in str(error.details())
                    details.setdefault(code, str(error.details())[:120])
                    typed = from_rpc_error(error)  # the SDK's reading of the hints
                    wait = typed.retry_after if isinstance(typed, Overloaded) else None
                    left = typed.seconds_left if isinstance(typed, DeadlineExceeded) else None
                    bare = error.details() == "Deadline Exceeded"
                done = loop.time()
                # Calls sent in the window count, wherever their answer lands: a
                # starved generator reads answers a second or more late, and
                # counting by when it read them drops answers the server gave
                # in time (the capacity phase is counted the same way).
                if sent < end:
                    outcomes[code] = outcomes.get(code, 0) + 1
                    if code == "OK":
                        latencies.append(done - began)
                    elif code == "RESOURCE_EXHAUSTED":
                        refusals.append(done - sent)
                    elif code == "DEADLINE_EXCEEDED":
                        late.append(done - sent)
                        unparsed += on_arrival
                        unanswered += bare
                        if left is not None:
                            refused_late.append(done - sent)
                            before_server.append(max(0.0, deadline - left - sent))
                            after_server.append(max(0.0, done - (deadline - left)))
                    answered.append(done - sent)
                if code not in _RETRIED or args.light:
                    break
                if args.no_backoff:
                    wait = 0.0
                elif wait is None:  # the SDK's jittered exponential backoff
                    wait = random.uniform(0.0, min(2.0, 0.05 * 2 ** (attempt - 1)))
                if loop.time() + wait >= deadline:
                    break
                await asyncio.sleep(wait)
            if args.light:  # one call at a time, a few per second
                await asyncio.sleep(0.05)

    lags: list[float] = []  # how late a 10 ms timer fires: this process's own delay

    async def ticker() -> None:
        while loop.time() < end:
            due = loop.time() + 0.01
            await asyncio.sleep(0.01)
            lags.append(loop.time() - due)

    clock = asyncio.ensure_future(ticker())
    tasks = [asyncio.ensure_future(slot(i)) for i in range(args.inflight)]
    # Bounded even when starved of CPU: calls still out after the last
    # deadline could have passed are cancelled.
    _, unfinished = await asyncio.wait(tasks, timeout=args.seconds + args.deadline + 5)
    for task in (*unfinished, clock):
        task.cancel()
    figures = {
        "seconds": args.seconds,
        "outcomes": outcomes,
        "details": details,
        "ok_per_s": outcomes.get("OK", 0) / args.seconds,
        "ok_ms": _percentiles(latencies),
        "refused_ms": _percentiles(refusals),
        "deadline_ms": _percentiles(late),
        "refused_late_ms": _percentiles(refused_late),
        "refused_late_before_ms": _percentiles(before_server),
        "refused_late_after_ms": _percentiles(after_server),
        "refused_unparsed": unparsed,
        "unanswered": unanswered,
        "any_ms": _percentiles(answered),
        "loop_lag_ms": _percentiles(lags),
    }
    print(json.dumps(figures), flush=True)
    # Not waiting for thousands of cancelled calls, or gRPC's threads, to wind
    # down when starved of CPU: the figures are out, nobody reads the rest.
    os._exit(0)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1e3
    return {"n": len(ms), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--inflight", type=int, default=2000)
    parser.add_argument("--deadline", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--light", action="store_true")
    parser.add_argument("--no-backoff", action="store_true")
    args = parser.parse_args()
    os.nice(args.nice)
    asyncio.run(_generate(args))


if __name__ == "__main__":
    main()
