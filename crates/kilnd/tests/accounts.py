"""One principal against another's image, through boto3: every operation that names it.

Usage: accounts.py API_URL THEIR_IMAGE_ARN
Signs with the [default] profile of $AWS_SHARED_CREDENTIALS_FILE; prints JSON: for each operation on the
other principal's image, the error code boto3 raised (or "ok"), and what the caller's own
`app` looks like by bare name.
"""
import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def main(api, theirs):
    client = boto3.client(
        "lambda-microvms",
        endpoint_url=api,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, parameter_validation=False),
    )

    def code(call, **kwargs):
        try:
            call(**kwargs)
            return "ok"
        except ClientError as e:
            return e.response["Error"]["Code"]

    ops = {
        "GetMicrovmImage": code(client.get_microvm_image, imageIdentifier=theirs),
        "GetMicrovmImageVersion": code(
            client.get_microvm_image_version, imageIdentifier=theirs, imageVersion="1"
        ),
        "ListMicrovmImageVersions": code(
            client.list_microvm_image_versions, imageIdentifier=theirs
        ),
        "ListMicrovms": code(client.list_microvms, imageIdentifier=theirs),
        "RunMicrovm": code(client.run_microvm, imageIdentifier=theirs),
        "ListTags": code(client.list_tags, Resource=theirs),
        "TagResource": code(client.tag_resource, Resource=theirs, Tags={"k": "v"}),
        "DeleteMicrovmImage": code(client.delete_microvm_image, imageIdentifier=theirs),
    }
    own = client.get_microvm_image(imageIdentifier="app")
    listed = [i["imageArn"] for i in client.list_microvm_images()["items"]]
    print(json.dumps({"ops": ops, "ownArn": own["imageArn"], "listed": listed}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
