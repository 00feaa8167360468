"""Lifecycle races with boto3, as a client would make them: terminate during launch, during
suspend and during resume; suspend during resume; a client that gives up during an
auto-resume, then one that waits; ten requests at once to a suspended MicroVM. Each race is
tried with several delays between the two calls.

Usage: races.py API_URL ENDPOINT_PORT CA_PEM IMAGE
Prints one JSON line: a list of what each attempt saw (the calls' outcomes, the MicroVM's
final state, and kilnd's admitted capacity afterwards). The Rust test asserts on it.
"""
import json
import re
import socket
import ssl
import sys
import threading
import time
import urllib.request

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from endpoint_client import get

DELAYS = (0.0, 0.03, 0.09)


def main(api, endpoint_port, ca, image):
    client = boto3.client(
        "lambda-microvms",
        endpoint_url=api,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, read_timeout=300),
    )

    def call(fn, **kw):
        try:
            fn(**kw)
            return "ok"
        except ClientError as e:
            return e.response["Error"]["Code"]

    def run():
        return client.run_microvm(
            imageIdentifier=image,
            idlePolicy={
                "maxIdleDurationSeconds": 600,
                "suspendedDurationSeconds": 600,
                "autoResumeEnabled": True,
            },
        )["microvmId"]

    def state(mid):
        return client.get_microvm(microvmIdentifier=mid)["state"]

    def terminate(mid):
        return call(client.terminate_microvm, microvmIdentifier=mid)

    def suspend(mid):
        return call(client.suspend_microvm, microvmIdentifier=mid)

    def resume(mid):
        return call(client.resume_microvm, microvmIdentifier=mid)

    def admitted():
        text = urllib.request.urlopen(api + "/metrics", timeout=30).read().decode()
        figures = {}
        for name in ("kiln_admitted_microvms", "kiln_admitted_memory_mib", "kiln_microvm_resumes_total"):
            total = 0
            for m in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
                if name.endswith("resumes_total") and 'result="ok"' not in (m.group(1) or ""):
                    continue
                total += float(m.group(2))
            figures[name] = total
        return figures

    def in_background(fn, *args):
        out = {}
        t = threading.Thread(target=lambda: out.__setitem__("result", fn(*args)))
        t.start()
        return t, out

    seen = []

    def record(race, delay, mid, **calls):
        seen.append(
            {"race": race, "delay": delay, "microvm": mid, "final": state(mid), "calls": calls, "after": admitted()}
        )

    # Terminate while RunMicrovm is still starting the MicroVM.
    for delay in DELAYS:
        before = {i["microvmId"] for i in client.list_microvms(imageIdentifier=image)["items"]}
        t, out = in_background(lambda: call(client.run_microvm, imageIdentifier=image))
        mid = None
        deadline = time.time() + 60
        while mid is None and time.time() < deadline:
            for item in client.list_microvms(imageIdentifier=image)["items"]:
                if item["microvmId"] not in before:
                    mid = item["microvmId"]
            time.sleep(0.01)
        time.sleep(delay)
        term = terminate(mid)
        t.join()
        record("terminate-during-launch", delay, mid, run=out["result"], terminate=term)

    # Terminate while a suspend is under way.
    for delay in DELAYS:
        mid = run()
        t, out = in_background(suspend, mid)
        time.sleep(delay)
        term = terminate(mid)
        t.join()
        record("terminate-during-suspend", delay, mid, suspend=out["result"], terminate=term)

    # Terminate, or suspend, while a resume is under way.
    for race in ("terminate-during-resume", "suspend-during-resume"):
        for delay in DELAYS:
            mid = run()
            assert suspend(mid) == "ok"
            t, out = in_background(resume, mid)
            time.sleep(delay)
            second = terminate(mid) if race.startswith("terminate") else suspend(mid)
            t.join()
            record(race, delay, mid, resume=out["result"], second=second)
            terminate(mid)

    # A client that gives up during an auto-resume, then one that waits.
    mid = run()
    token = client.create_microvm_auth_token(
        microvmIdentifier=mid, expirationInMinutes=5, allowedPorts=[{"port": 8080}]
    )["authToken"]["X-aws-proxy-auth"]
    assert suspend(mid) == "ok"
    resumes_before = admitted()["kiln_microvm_resumes_total"]
    gave_up = "answered"
    try:
        ctx = ssl.create_default_context(cafile=ca)
        conn = __import__("http.client").client.HTTPSConnection(
            "127.0.0.1", int(endpoint_port), context=ctx, timeout=0.15
        )
        conn.putrequest("GET", "/cgi-bin/count", skip_host=True)
        conn.putheader("Host", f"{mid}.kiln.localhost:{endpoint_port}")
        conn.putheader("X-aws-proxy-auth", token)
        conn.endheaders()
        conn.getresponse()
    except (socket.timeout, TimeoutError):
        gave_up = "timed out"
    finally:
        conn.close()
    waited = get(endpoint_port, ca, mid, "/cgi-bin/count", token)
    record(
        "disconnect-during-auto-resume",
        0.15,
        mid,
        first=gave_up,
        second=f"{waited[0]}",
        resumes=admitted()["kiln_microvm_resumes_total"] - resumes_before,
    )

    # Ten requests at once to a suspended MicroVM: one resume serves them all.
    assert suspend(mid) == "ok"
    resumes_before = admitted()["kiln_microvm_resumes_total"]
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(get(endpoint_port, ca, mid, "/cgi-bin/count", token)[0]))
        for _ in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record(
        "ten-requests-to-a-suspended-vm",
        0.0,
        mid,
        statuses=sorted(answers),
        resumes=admitted()["kiln_microvm_resumes_total"] - resumes_before,
    )
    terminate(mid)
    print(json.dumps({"races": seen, "end": admitted()}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
