"""Quota and throttling errors as boto3 raises them: the typed exceptions of botocore's
lambda-microvms model, with their modeled members and the Retry-After header.

Usage: quotas_boto3.py API_URL HOME
Each principal's artifact is an empty object in its own bucket (only admin may name host files):
no zip, so builds from it fail at once, without a VM, and it stores no bytes. Signs as the principals whose credentials the Rust test wrote to HOME/credentials-<name>
(alice, bob, carol, dave, erin). Prints one JSON object of what each call raised; the Rust
test asserts on it.
"""
import json
import sys
import time

import boto3
from botocore.config import Config

BOGUS = {}


def profile(home, principal):
    pairs = (line.split("=", 1) for line in open(f"{home}/credentials-{principal}") if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def client(api, home, principal, service="lambda-microvms"):
    p = profile(home, principal)
    extra = {"s3": {"addressing_style": "path"}} if service == "s3" else {}
    return boto3.session.Session().client(
        service,
        endpoint_url=api,
        region_name="us-east-1",
        aws_access_key_id=p["aws_access_key_id"],
        aws_secret_access_key=p["aws_secret_access_key"],
        config=Config(retries={"max_attempts": 1}, **extra),
    )


def raised(c, call):
    """What `call` raised: the typed exception's class and its members, or OK."""
    typed = (
        c.exceptions.ServiceQuotaExceededException,
        c.exceptions.ThrottlingException,
        c.exceptions.ResourceNotFoundException,
    )
    try:
        call()
        return {"class": "OK"}
    except typed as e:
        kind, r = type(e).__name__, e.response
    except Exception as e:  # noqa: BLE001 - reported, the test says what was expected
        return {"class": type(e).__name__, "text": str(e)}
    return {
        "class": kind,
        "message": r.get("Error", {}).get("Message") or r.get("message"),
        "quotaCode": r.get("quotaCode"),
        "serviceCode": r.get("serviceCode"),
        "resourceType": r.get("resourceType"),
        "retryAfterSeconds": r.get("retryAfterSeconds"),
        "retryAfterHeader": r["ResponseMetadata"]["HTTPHeaders"].get("retry-after"),
    }


def bogus(api, home, principal):
    """Uploads the principal's empty artifact; its s3:// URI."""
    s3 = client(api, home, principal, "s3")
    bucket = f"bogus-{principal}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="bad.zip", Body=b"")
    return f"s3://{bucket}/bad.zip"


def create(c, name):
    return lambda: c.create_microvm_image(
        name=name,
        baseImageArn="arn:aws:lambda:local:aws:microvm-image:busybox",
        buildRoleArn="arn:aws:iam::000000000000:role/kiln-build",
        codeArtifact={"uri": BOGUS[id(c)]},
    )


def settled(c, name):
    """Waits until the image's build ended (these builds fail fast: no such artifact)."""
    for _ in range(300):
        if c.get_microvm_image(imageIdentifier=name)["state"] not in ("CREATING", "UPDATING"):
            return
        time.sleep(0.2)
    raise SystemExit(f"image {name} still building")


def principal_client(api, home, principal):
    """A lambda-microvms client for `principal`, its artifact uploaded."""
    c = client(api, home, principal)
    BOGUS[id(c)] = bogus(api, home, principal)
    return c


def main(api, home):
    out = {}
    alice = principal_client(api, home, "alice")
    out["alice1"] = raised(alice, create(alice, "a1"))
    settled(alice, "a1")
    out["alice2"] = raised(alice, create(alice, "a2"))
    settled(alice, "a2")
    out["aliceImages"] = raised(alice, create(alice, "a3"))
    update = lambda: alice.update_microvm_image(
        imageIdentifier="a1",
        baseImageArn="arn:aws:lambda:local:aws:microvm-image:busybox",
        buildRoleArn="arn:aws:iam::000000000000:role/kiln-build",
        codeArtifact={"uri": BOGUS[id(alice)]},
    )
    out["aliceUpdate"] = raised(alice, update)
    settled(alice, "a1")
    out["aliceVersions"] = raised(alice, update)

    bob = client(api, home, "bob")
    get = lambda c: (lambda: c.get_microvm(microvmIdentifier="mvm-000000000000000000"))
    out["bobGet1"] = raised(bob, get(bob))
    out["bobGet2"] = raised(bob, get(bob))
    out["aliceGet"] = raised(alice, get(alice))

    carol = principal_client(api, home, "carol")
    out["carolBuilds"] = raised(carol, create(carol, "c1"))

    dave_s3 = client(api, home, "dave", "s3")
    dave_s3.create_bucket(Bucket="dave-b")
    dave_s3.put_object(Bucket="dave-b", Key="small", Body=b"x" * 60_000)
    try:
        dave_s3.put_object(Bucket="dave-b", Key="big", Body=b"x" * 60_000)
        out["daveUpload"] = {"code": "OK"}
    except dave_s3.exceptions.ClientError as e:
        out["daveUpload"] = {
            "code": e.response["Error"]["Code"],
            "message": e.response["Error"].get("Message"),
        }
    erin = principal_client(api, home, "erin")
    out["erinStored"] = raised(erin, create(erin, "e1"))
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
