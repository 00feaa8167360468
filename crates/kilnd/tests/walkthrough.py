"""AWS's Lambda MicroVMs walkthrough with boto3 against kiln, after the zip was uploaded with
`aws s3 cp`: image from s3://, wait for CREATED, run with an idle policy, token, HTTPS,
suspend, resume, terminate. Signed with the credentials AWS_SHARED_CREDENTIALS_FILE names.

Usage: walkthrough.py API_URL ENDPOINT_PORT CA_PEM S3_URI
Prints one JSON line with what each step saw; the Rust test asserts on it.
"""
import json
import sys
import time

import boto3
from botocore.config import Config

from endpoint_client import get


def main(api, endpoint_port, ca, uri):
    client = boto3.client(
        "lambda-microvms",
        endpoint_url=api,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )
    seen = {}
    client.create_microvm_image(
        name="walk",
        baseImageArn="arn:aws:lambda:local:aws:microvm-image:busybox",
        buildRoleArn="arn:aws:iam::000000000000:role/kiln-build",
        codeArtifact={"uri": uri},
        resources=[{"minimumMemoryInMiB": 512}],
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        image = client.get_microvm_image(imageIdentifier="walk")
        if image["state"] not in ("CREATING", "UPDATING"):
            break
        time.sleep(1)
    seen["image"] = image["state"]
    vm = client.run_microvm(
        imageIdentifier="walk",
        idlePolicy={
            "maxIdleDurationSeconds": 600,
            "suspendedDurationSeconds": 600,
            "autoResumeEnabled": True,
        },
    )
    mid = vm["microvmId"]
    seen["run"] = vm["state"]
    token = client.create_microvm_auth_token(
        microvmIdentifier=mid, expirationInMinutes=5, allowedPorts=[{"port": 8080}]
    )["authToken"]["X-aws-proxy-auth"]
    seen["first"] = get(endpoint_port, ca, mid, "/cgi-bin/count", token)
    client.suspend_microvm(microvmIdentifier=mid)
    seen["suspended"] = client.get_microvm(microvmIdentifier=mid)["state"]
    client.resume_microvm(microvmIdentifier=mid)
    seen["resumed"] = client.get_microvm(microvmIdentifier=mid)["state"]
    seen["second"] = get(endpoint_port, ca, mid, "/cgi-bin/count", token)
    client.terminate_microvm(microvmIdentifier=mid)
    seen["terminated"] = client.get_microvm(microvmIdentifier=mid)["state"]
    print(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:5])
