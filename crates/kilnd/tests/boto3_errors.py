"""boto3 against kilnd: an image is created and read, and each error kind is a typed exception.

Usage: boto3_errors.py ENDPOINT_URL ZIP_PATH
(signs with the default credentials: the caller sets AWS_SHARED_CREDENTIALS_FILE)
"""
import sys

import boto3
from botocore.config import Config

endpoint, zip_path = sys.argv[1], sys.argv[2]
client = boto3.client(
    "lambda-microvms",
    endpoint_url=endpoint,
    region_name="us-east-1",
    config=Config(retries={"max_attempts": 1}),
)
base = "arn:aws:lambda:local:aws:microvm-image:busybox"
role = "arn:aws:iam::000000000000:role/kiln-build"

created = client.create_microvm_image(
    name="from-boto3",
    baseImageArn=base,
    buildRoleArn=role,
    codeArtifact={"uri": "file://" + zip_path},
    clientToken="token-1",
)
assert created["state"] == "CREATING", created
again = client.create_microvm_image(
    name="from-boto3",
    baseImageArn=base,
    buildRoleArn=role,
    codeArtifact={"uri": "file://" + zip_path},
    clientToken="token-1",
)
assert again["imageVersion"] == created["imageVersion"], "clientToken must make create idempotent"
got = client.get_microvm_image(imageIdentifier=created["imageArn"])
assert got["name"] == "from-boto3", got
managed = client.list_managed_microvm_images()["items"]
assert any(i["imageArn"] == base for i in managed), managed


def expect(exc, call, **kwargs):
    try:
        call(**kwargs)
    except exc as e:
        print("ok:", type(e).__name__, "-", e.response["Error"]["Message"])
        return
    raise AssertionError(f"{call.__name__} did not raise {exc.__name__}")


expect(client.exceptions.ResourceNotFoundException, client.get_microvm_image, imageIdentifier="missing")
expect(
    client.exceptions.ConflictException,
    client.create_microvm_image,
    name="from-boto3",
    baseImageArn=base,
    buildRoleArn=role,
    codeArtifact={"uri": "file://" + zip_path},
)
expect(
    client.exceptions.ValidationException,
    client.create_microvm_image,
    name="bad name!",
    baseImageArn=base,
    buildRoleArn=role,
    codeArtifact={"uri": "file://" + zip_path},
)
print("boto3: all typed errors as expected")
