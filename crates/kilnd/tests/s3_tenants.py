"""Another principal walks every S3 operation kiln's store serves against alice's bucket.

Usage: s3_tenants.py API_URL ALICE_CREDENTIALS BOB_CREDENTIALS
Alice makes a bucket with a private object and an open multipart upload; bob makes his own
bucket; then bob tries each operation on alice's bucket (or with it as a copy source).
Prints one JSON object: each operation's S3 error code ("OK" if it succeeded), what bob's
ListBuckets showed, and alice's object afterwards; the Rust test asserts on it.
"""
import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def client(api, credentials):
    session = boto3.session.Session()
    pairs = (line.split("=", 1) for line in open(credentials) if "=" in line)
    profile = {k.strip(): v.strip() for k, v in pairs}
    return session.client(
        "s3",
        endpoint_url=api,
        region_name="us-east-1",
        aws_access_key_id=profile["aws_access_key_id"],
        aws_secret_access_key=profile["aws_secret_access_key"],
        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
    )


def outcome(call):
    try:
        call()
        return "OK"
    except ClientError as e:
        return e.response.get("Error", {}).get("Code", "?")


def main(api, alice_creds, bob_creds):
    alice = client(api, alice_creds)
    bob = client(api, bob_creds)
    alice.create_bucket(Bucket="alice-b")
    alice.put_object(Bucket="alice-b", Key="app.zip", Body=b"alice's private zip")
    upload = alice.create_multipart_upload(Bucket="alice-b", Key="big.bin")["UploadId"]
    bob.create_bucket(Bucket="bob-b")
    bob_upload = bob.create_multipart_upload(Bucket="bob-b", Key="copy.bin")["UploadId"]
    src = {"Bucket": "alice-b", "Key": "app.zip"}
    walk = {
        "HeadBucket": lambda: bob.head_bucket(Bucket="alice-b"),
        "GetBucketLocation": lambda: bob.get_bucket_location(Bucket="alice-b"),
        "ListObjects": lambda: bob.list_objects(Bucket="alice-b"),
        "ListObjectsV2": lambda: bob.list_objects_v2(Bucket="alice-b"),
        "ListObjectVersions": lambda: bob.list_object_versions(Bucket="alice-b"),
        "ListMultipartUploads": lambda: bob.list_multipart_uploads(Bucket="alice-b"),
        "GetObject": lambda: bob.get_object(Bucket="alice-b", Key="app.zip"),
        "HeadObject": lambda: bob.head_object(Bucket="alice-b", Key="app.zip"),
        "PutObject": lambda: bob.put_object(Bucket="alice-b", Key="app.zip", Body=b"bob"),
        "DeleteObject": lambda: bob.delete_object(Bucket="alice-b", Key="app.zip"),
        "DeleteObjects": lambda: bob.delete_objects(
            Bucket="alice-b", Delete={"Objects": [{"Key": "app.zip"}]}
        ),
        "CopyObject(from hers)": lambda: bob.copy_object(
            Bucket="bob-b", Key="stolen.zip", CopySource=src
        ),
        "CopyObject(into hers)": lambda: bob.copy_object(
            Bucket="alice-b", Key="app.zip", CopySource={"Bucket": "bob-b", "Key": "x"}
        ),
        "CreateMultipartUpload": lambda: bob.create_multipart_upload(
            Bucket="alice-b", Key="bob.bin"
        ),
        "UploadPart": lambda: bob.upload_part(
            Bucket="alice-b", Key="big.bin", UploadId=upload, PartNumber=1, Body=b"bob"
        ),
        "UploadPartCopy(from hers)": lambda: bob.upload_part_copy(
            Bucket="bob-b", Key="copy.bin", UploadId=bob_upload, PartNumber=1, CopySource=src
        ),
        "ListParts": lambda: bob.list_parts(Bucket="alice-b", Key="big.bin", UploadId=upload),
        "CompleteMultipartUpload": lambda: bob.complete_multipart_upload(
            Bucket="alice-b",
            Key="big.bin",
            UploadId=upload,
            MultipartUpload={"Parts": [{"ETag": '"0"', "PartNumber": 1}]},
        ),
        "AbortMultipartUpload": lambda: bob.abort_multipart_upload(
            Bucket="alice-b", Key="big.bin", UploadId=upload
        ),
        "DeleteBucket": lambda: bob.delete_bucket(Bucket="alice-b"),
        "CreateBucket": lambda: bob.create_bucket(Bucket="alice-b"),
    }
    seen = {"ops": {name: outcome(call) for name, call in walk.items()}}
    seen["bobBuckets"] = sorted(b["Name"] for b in bob.list_buckets().get("Buckets", []))
    seen["aliceBuckets"] = sorted(b["Name"] for b in alice.list_buckets().get("Buckets", []))
    seen["aliceObject"] = (
        alice.get_object(Bucket="alice-b", Key="app.zip")["Body"].read().decode()
    )
    print(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:4])
