"""Every operation of botocore's lambda-microvms model, called through boto3 against a real
kilnd with inputs derived from the model, each answer checked against the operation's
output shape; and for each operation one cheap bad input that must raise a modeled,
typed exception.

Usage: model_walk.py API_URL ENDPOINT_PORT CA_PEM ZIP_PATH
(signs with the default credentials: the caller sets AWS_SHARED_CREDENTIALS_FILE)

Prints one JSON object: the model's operations, how often each was called, the typed errors
its bad inputs raised, what the walk saw, and every failure, each naming its operation.
The Rust test (model_walk.rs) asserts on it.
"""
import collections
import datetime
import json
import re
import sys
import time
import traceback
import uuid

import boto3
import botocore.session
from botocore import xform_name
from botocore.config import Config
from botocore.model import ServiceModel

from endpoint_client import get

SERVICE = "lambda-microvms"
# kilnd's --client-token-ttl-secs and --terminated-retention-secs in model_walk.rs.
TOKEN_TTL = 15
RETENTION = 30
ROLE = "arn:aws:iam::000000000000:role/kiln-build"
IMAGE = "walk"
# Error kinds boto3_errors.py already checks for these operations; the walk does not repeat them.
COVERED_ELSEWHERE = {
    "CreateMicrovmImage": [
        "ConflictException (boto3_errors.py)",
        "ValidationException (boto3_errors.py)",
    ],
    "GetMicrovmImage": ["ResourceNotFoundException (boto3_errors.py)"],
}


def load_model():
    """The model botocore itself uses, read through its loader."""
    loader = botocore.session.get_session().get_component("data_loader")
    return ServiceModel(loader.load_service_model(SERVICE, "service-2"), service_name=SERVICE)


class Underivable(Exception):
    """A required input the model alone cannot give a valid value for."""


def derive(shape, path):
    """A value of `shape` the model accepts: required members only, a union's first member,
    an enum's first value, strings, lists and numbers at their minimum (at least one)."""
    kind = shape.type_name
    meta = shape.metadata
    if kind == "structure":
        if shape.is_tagged_union:
            first = next(iter(shape.members))
            return {first: derive(shape.members[first], f"{path}.{first}")}
        return {
            name: derive(shape.members[name], f"{path}.{name}")
            for name in shape.required_members
        }
    if kind == "list":
        return [derive(shape.member, f"{path}[]") for _ in range(max(meta.get("min", 0), 1))]
    if kind == "map":
        return {derive(shape.key, f"{path}{{key}}"): derive(shape.value, f"{path}{{}}")}
    if kind == "string":
        if shape.enum:
            return shape.enum[0]
        value = "a" * max(meta.get("min", 0), 1)
        if not pattern_allows(meta.get("pattern"), value):
            raise Underivable(f"{path}: 'a'-strings do not match the pattern {meta['pattern']}")
        return value
    if kind in ("integer", "long"):
        return max(meta.get("min", 1), 1)
    if kind == "boolean":
        return True
    raise Underivable(f"{path}: no derivation for type {kind}")


def pattern_allows(pattern, value):
    """Whether `value` matches a model pattern (Smithy patterns are not anchored). Patterns
    Python cannot compile (Java's \\p{L} classes) are taken as matching."""
    if pattern is None:
        return True
    try:
        return re.search(pattern, value) is not None
    except re.error:
        return True


def conform(shape, value, path, wire):
    """Every way `value` departs from `shape`: missing required members, unknown members,
    wrong types, enum values, lengths, ranges and patterns. `wire` means the raw JSON
    body (members by their serialized names, timestamps as epoch numbers); otherwise
    botocore's parsed output (timestamps as datetimes)."""
    kind = shape.type_name
    meta = shape.metadata
    problems = []

    def wrong(expected):
        return [f"{path}: expected {expected}, got {type(value).__name__} {value!r}"]

    def length_ok(n, what):
        if "min" in meta and n < meta["min"]:
            problems.append(f"{path}: {what} {n} below the model's min {meta['min']}")
        if "max" in meta and n > meta["max"]:
            problems.append(f"{path}: {what} {n} above the model's max {meta['max']}")

    if kind == "structure":
        if not isinstance(value, dict):
            return wrong("an object")
        body_members = {
            (m.serialization.get("name", name) if wire else name): (name, m)
            for name, m in shape.members.items()
            if not (wire and m.serialization.get("location"))
        }
        for key in value:
            if key not in body_members:
                problems.append(f"{path}: member '{key}' is not in {shape.name}")
        for name in shape.required_members:
            member = shape.members[name]
            if wire and member.serialization.get("location"):
                continue
            key = member.serialization.get("name", name) if wire else name
            if value.get(key) is None:
                problems.append(f"{path}: required member '{key}' of {shape.name} is missing")
        if shape.is_tagged_union and len([v for v in value.values() if v is not None]) != 1:
            problems.append(f"{path}: union {shape.name} must set exactly one member")
        for key, item in value.items():
            if key in body_members and item is not None:
                _, member = body_members[key]
                problems += conform(member, item, f"{path}.{key}", wire)
    elif kind == "list":
        if not isinstance(value, list):
            return wrong("a list")
        length_ok(len(value), "length")
        for i, item in enumerate(value):
            problems += conform(shape.member, item, f"{path}[{i}]", wire)
    elif kind == "map":
        if not isinstance(value, dict):
            return wrong("a map")
        length_ok(len(value), "size")
        for key, item in value.items():
            problems += conform(shape.key, key, f"{path}{{key {key!r}}}", wire)
            problems += conform(shape.value, item, f"{path}[{key!r}]", wire)
    elif kind == "string":
        if not isinstance(value, str):
            return wrong("a string")
        if shape.enum and value not in shape.enum:
            problems.append(f"{path}: {value!r} is not one of {shape.name}'s values {shape.enum}")
        length_ok(len(value), "length")
        if not pattern_allows(meta.get("pattern"), value):
            problems.append(f"{path}: {value!r} does not match the pattern {meta['pattern']}")
    elif kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            return wrong("an integer")
        length_ok(value, "value")
    elif kind in ("float", "double"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return wrong("a number")
    elif kind == "boolean":
        if not isinstance(value, bool):
            return wrong("a boolean")
    elif kind == "timestamp":
        if wire and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return wrong("epoch seconds (rest-json's timestamp format)")
        if not wire and not isinstance(value, datetime.datetime):
            return wrong("a datetime")
    else:
        problems.append(f"{path}: the checker does not know type {kind}")
    return problems


class Abort(Exception):
    """A call the rest of the walk depends on failed."""


class Walk:
    """Calls operations by model name with derived inputs and checks each answer."""

    def __init__(self, api, model):
        self.model = model
        self.client = self.make_client(api, validate=True)
        # Bad inputs must reach kilnd, so this client leaves validation to the server.
        self.unchecked = self.make_client(api, validate=False)
        self.called = collections.Counter()
        self.typed_errors = {op: list(errors) for op, errors in COVERED_ELSEWHERE.items()}
        self.failures = []
        self.raw = None
        self.checker_checked = False
        # Idempotency tokens unique to this walk, so a kilnd that saw an earlier walk
        # does not replay its answers.
        self.token_prefix = f"model-walk-{uuid.uuid4().hex[:12]}"

    def make_client(self, api, validate):
        client = boto3.client(
            SERVICE,
            endpoint_url=api,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, parameter_validation=validate),
        )
        client.meta.events.register(f"before-parse.{SERVICE}.*", self.keep_raw)
        return client

    def keep_raw(self, response_dict, **_):
        self.raw = response_dict

    def token(self, name):
        """The idempotency token the walk sends with `name`."""
        return f"{self.token_prefix}-{name}"

    def params(self, name, overrides):
        op = self.model.operation_model(name)
        params = {}
        for member in op.input_shape.required_members:
            if member not in overrides:
                shape = op.input_shape.members[member]
                params[member] = derive(shape, f"{name}.{member}")
        params.update(overrides)
        return params

    def call(self, name, /, **overrides):
        """Calls `name`; its parsed output, checked against the model. An operation with an
        idempotency token is sent twice with the same token and must answer the same.
        A failure aborts the walk: later steps need what this one makes."""
        op = self.model.operation_model(name)
        try:
            params = self.params(name, overrides)
        except Underivable as e:
            self.failures.append(f"{name}: {e}; the walk must give it a value")
            raise Abort() from e
        for member in op.idempotent_members:
            params.setdefault(member, self.token(name))
        out = self.send(op, params)
        if op.idempotent_members:
            again = self.send(op, params)
            if again != out:
                self.failures.append(
                    f"{name}: a repeat with the same {'/'.join(op.idempotent_members)} "
                    f"answered differently:\n first {out}\n then  {again}"
                )
        return out

    def send(self, op, params):
        """One call of `op`; its parsed output, and a failure for every departure from the
        output shape in it or in the raw body."""
        name = op.name
        self.called[name] += 1
        try:
            out = getattr(self.client, xform_name(name))(**params)
        except Exception as e:  # noqa: BLE001 - every failure is reported with the operation
            self.failures.append(f"{name}: the call failed: {type(e).__name__}: {e}")
            raise Abort() from e
        out.pop("ResponseMetadata", None)
        problems = []
        if op.output_shape is None:
            if self.raw["body"].strip():
                problems.append(f"the model has no output, kilnd sent {self.raw['body'][:200]!r}")
        else:
            problems += conform(op.output_shape, out, "output", wire=False)
            try:
                body = json.loads(self.raw["body"] or b"{}")
                problems += conform(op.output_shape, body, "body", wire=True)
                if name == "GetMicrovm" and not self.checker_checked:
                    self.checker_checked = True
                    self.check_the_checker(op.output_shape, body)
            except ValueError as e:
                problems.append(f"body is not JSON ({e}): {self.raw['body'][:200]!r}")
        for p in problems:
            self.failures.append(f"{name}: response does not match the model: {p}")
        return out

    def check_the_checker(self, shape, body):
        """Plants one departure at a time in a conforming body; the checker must report
        each, or the walk would pass whatever kilnd sent."""
        def but(key, value):
            return {**body, key: value}

        first_required = next(iter(shape.required_members))
        planted = {
            f"required '{first_required}' missing": {
                k: v for k, v in body.items() if k != first_required
            },
            "an unknown member": but("notInTheModel", 1),
        }
        for key, member in shape.members.items():
            if key not in body:
                continue
            if member.type_name == "string" and member.enum:
                planted[f"'{key}' outside its enum"] = but(key, "NOT_IN_THE_MODEL")
            if member.type_name == "integer":
                planted[f"'{key}' as a string"] = but(key, str(body[key]))
            if member.type_name == "timestamp":
                planted[f"'{key}' as an ISO date"] = but(key, "2025-09-09T00:00:00Z")
        for what, bad in planted.items():
            if not conform(shape, bad, "body", wire=True):
                self.failures.append(f"the output checker missed {what} in a {shape.name}")

    def fails(self, name, error, /, saying=None, **overrides):
        """Calls `name` with a bad input; it must raise `error` as the typed
        `client.exceptions.<error>` (with `saying` in its message, when given), and the model
        must list that error for `name`."""
        self.called[name] += 1
        modeled = [s.name for s in self.model.operation_model(name).error_shapes]
        if error not in modeled:
            self.failures.append(f"{name}: {error} is not among its modeled errors {modeled}")
            return
        exc = getattr(self.unchecked.exceptions, error)
        try:
            getattr(self.unchecked, xform_name(name))(**self.params(name, overrides))
        except exc as e:
            message = e.response["Error"]["Message"]
            if not message:
                self.failures.append(f"{name}: {error} came without a message")
            elif saying and saying not in message:
                self.failures.append(f"{name}: {error} says {message!r}, not {saying!r}")
            self.typed_errors.setdefault(name, []).append(error)
            return
        except Exception as e:  # noqa: BLE001
            self.failures.append(
                f"{name}: bad input {overrides} raised {type(e).__name__} ({e}), not {error}"
            )
            return
        self.failures.append(f"{name}: bad input {overrides} succeeded; expected {error}")


def wait_built(walk, version):
    """Polls GetMicrovmImageVersion until the build of `version` ends; the walk goes on
    only if it succeeded."""
    deadline = time.time() + 600
    while True:
        v = walk.call("GetMicrovmImageVersion", imageIdentifier=IMAGE, imageVersion=version)
        if v["state"] not in ("PENDING", "IN_PROGRESS") or time.time() > deadline:
            break
        time.sleep(1)
    if v["state"] != "SUCCESSFUL":
        walk.failures.append(
            f"GetMicrovmImageVersion: version {version} is {v['state']}: {v.get('stateReason')}"
        )
        raise Abort()
    return v["state"]


def steps(walk, seen, endpoint_port, ca, zip_path):
    """The walk, ordered so every resource an operation names exists when it is called."""
    code = {"uri": "file://" + zip_path}
    version_1 = {"imageIdentifier": IMAGE, "imageVersion": "1"}
    version_2 = {"imageIdentifier": IMAGE, "imageVersion": "2"}
    missing = {"imageIdentifier": IMAGE, "imageVersion": "99"}

    # Managed bases.
    managed = walk.call("ListManagedMicrovmImages")
    busybox = next(i["imageArn"] for i in managed["items"] if i["imageArn"].endswith(":busybox"))
    walk.fails("ListManagedMicrovmImages", "ValidationException", maxResults=0)
    versions = walk.call("ListManagedMicrovmImageVersions", imageIdentifier=busybox)
    seen["managed_versions"] = len(versions["items"])
    walk.fails(
        "ListManagedMicrovmImageVersions",
        "ResourceNotFoundException",
        imageIdentifier="no-such-base",
    )

    # An image, built once; before it, what AWS refuses in an image's config.
    source = {"baseImageArn": busybox, "buildRoleArn": ROLE, "codeArtifact": code}
    walk.fails(
        "CreateMicrovmImage",
        "ValidationException",
        saying="Supported memory sizes in MiB are: [512, 1024, 2048, 4096, 8192]",
        name="walk-small",
        resources=[{"minimumMemoryInMiB": 256}],
        **source,
    )
    for hook in ("run", "resume", "suspend", "terminate"):
        walk.fails(
            "CreateMicrovmImage",
            "ValidationException",
            saying="Value at 'hooks.microvmImageHooks.ready' failed to satisfy constraint: "
            "Member must be ENABLED when a run, resume, suspend or terminate hook is enabled",
            name="walk-unready",
            hooks={"port": 9000, "microvmHooks": {hook: "ENABLED"}},
            **source,
        )
    created = walk.call(
        "CreateMicrovmImage", name=IMAGE, resources=[{"minimumMemoryInMiB": 512}], **source
    )
    image_arn = created["imageArn"]
    seen["created"] = [created["state"], created["imageVersion"]]
    seen["version_1"] = wait_built(walk, "1")
    walk.fails("GetMicrovmImageVersion", "ResourceNotFoundException", **missing)

    seen["image"] = walk.call("GetMicrovmImage", imageIdentifier=image_arn)["state"]
    listed = walk.call("ListMicrovmImages")
    seen["listed_images"] = [i["name"] for i in listed["items"]]
    walk.fails("ListMicrovmImages", "ValidationException", nextToken="not-a-token")
    versions = walk.call("ListMicrovmImageVersions", imageIdentifier=IMAGE)
    seen["versions"] = [v["imageVersion"] for v in versions["items"]]
    walk.fails(
        "ListMicrovmImageVersions", "ResourceNotFoundException", imageIdentifier="no-such-image"
    )
    builds = walk.call("ListMicrovmImageBuilds", **version_1)["items"]
    walk.fails("ListMicrovmImageBuilds", "ResourceNotFoundException", **missing)
    build = walk.call("GetMicrovmImageBuild", buildId=builds[0]["buildId"], **version_1)
    seen["build"] = build["buildState"]
    walk.fails(
        "GetMicrovmImageBuild", "ResourceNotFoundException", buildId="no-such-build", **version_1
    )

    # A second version; while it builds, neither the image nor the version can change or go.
    updated = walk.call(
        "UpdateMicrovmImage",
        imageIdentifier=IMAGE,
        description="the model walk's second version",
        resources=[{"minimumMemoryInMiB": 512}],
        **source,
    )
    seen["updated"] = [updated["state"], updated["imageVersion"]]
    walk.fails("UpdateMicrovmImage", "ConflictException", imageIdentifier=IMAGE, **source)
    walk.fails("DeleteMicrovmImage", "ConflictException", imageIdentifier=IMAGE)
    walk.fails("DeleteMicrovmImageVersion", "ConflictException", **version_2)
    seen["version_2"] = wait_built(walk, "2")

    # Version 2 retired: a run takes version 1, the latest ACTIVE one.
    retired = walk.call("UpdateMicrovmImageVersion", status="INACTIVE", **version_2)
    seen["retired"] = retired["status"]
    walk.fails("UpdateMicrovmImageVersion", "ValidationException", status="RETIRED", **version_2)
    walk.fails(
        "RunMicrovm",
        "ResourceNotFoundException",
        saying="No active version found for MicroVM image",
        **version_2,
    )
    walk.fails(
        "RunMicrovm",
        "ValidationException",
        saying="The run hook must be enabled in the MicroVM image to pass the run hook payload",
        imageIdentifier=IMAGE,
        runHookPayload="{}",
    )
    walk.fails(
        "RunMicrovm",
        "ValidationException",
        saying="Value at 'runHookPayload' failed to satisfy constraint: Member must have length "
        "less than or equal to 4096",
        imageIdentifier=IMAGE,
        runHookPayload="x" * 4097,
    )

    # One MicroVM.
    vm = walk.call("RunMicrovm", imageIdentifier=IMAGE, ingressNetworkConnectors=["SHELL_INGRESS"])
    run_at = time.time()
    mid = vm["microvmId"]
    seen["microvm"] = mid
    seen["run"] = [vm["state"], vm["imageVersion"]]
    # The run's clientToken again, with another parameter.
    walk.fails(
        "RunMicrovm",
        "ConflictException",
        imageIdentifier=IMAGE,
        clientToken=walk.token("RunMicrovm"),
        maximumDurationInSeconds=60,
    )
    try:
        seen["got"] = walk.call("GetMicrovm", microvmIdentifier=mid)["state"]
        walk.fails("GetMicrovm", "ResourceNotFoundException", microvmIdentifier="mvm-no-such-vm")
        listed = walk.call("ListMicrovms", imageIdentifier=IMAGE)
        seen["listed_microvms"] = [i["microvmId"] for i in listed["items"]]
        walk.fails("ListMicrovms", "ValidationException", maxResults=51)
        walk.fails("ListMicrovms", "ResourceNotFoundException", imageIdentifier="no-such-image")
        walk.fails(
            "DeleteMicrovmImage",
            "ConflictException",
            saying="Cannot delete microvm image with running microvms",
            imageIdentifier=IMAGE,
        )
        token = walk.call(
            "CreateMicrovmAuthToken",
            microvmIdentifier=mid,
            expirationInMinutes=5,
            allowedPorts=[{"port": 8080}],
        )["authToken"]["X-aws-proxy-auth"]
        seen["endpoint"] = list(get(endpoint_port, ca, mid, "/", token))
        shell = walk.call("CreateMicrovmShellAuthToken", microvmIdentifier=mid)["authToken"]
        seen["shell_token"] = sorted(shell)
        walk.call("SuspendMicrovm", microvmIdentifier=mid)
        seen["suspended"] = walk.call("GetMicrovm", microvmIdentifier=mid)["state"]
        walk.call("ResumeMicrovm", microvmIdentifier=mid)
        seen["resumed"] = walk.call("GetMicrovm", microvmIdentifier=mid)["state"]
        seen["endpoint_after_resume"] = list(get(endpoint_port, ca, mid, "/", token))
    finally:
        walk.call("TerminateMicrovm", microvmIdentifier=mid)
    seen["terminated"] = walk.call("GetMicrovm", microvmIdentifier=mid)["state"]
    walk.fails("TerminateMicrovm", "ResourceNotFoundException", microvmIdentifier="mvm-no-such-vm")
    # A terminated MicroVM takes no tokens and no transitions.
    walk.fails("CreateMicrovmAuthToken", "ConflictException", microvmIdentifier=mid)
    walk.fails("CreateMicrovmShellAuthToken", "ConflictException", microvmIdentifier=mid)
    walk.fails("SuspendMicrovm", "ConflictException", microvmIdentifier=mid)
    walk.fails("ResumeMicrovm", "ConflictException", microvmIdentifier=mid)

    # The run's clientToken expires (kilnd --client-token-ttl-secs, shortened by the test):
    # reused with other parameters it is no longer a conflict, the request runs anew (here
    # it names a missing version, so nothing launches).
    time.sleep(max(0.0, run_at + TOKEN_TTL + 2 - time.time()))
    walk.fails(
        "RunMicrovm",
        "ResourceNotFoundException",
        imageIdentifier=IMAGE,
        imageVersion="99",
        clientToken=walk.token("RunMicrovm"),
    )
    # A TERMINATED MicroVM stays visible for --terminated-retention-secs, then ages out.
    seen["terminated_later"] = walk.call("GetMicrovm", microvmIdentifier=mid)["state"]
    deadline = time.time() + RETENTION + 30
    while time.time() < deadline:
        try:
            walk.unchecked.get_microvm(microvmIdentifier=mid)
        except walk.unchecked.exceptions.ResourceNotFoundException:
            break
        time.sleep(1)
    walk.fails("GetMicrovm", "ResourceNotFoundException", microvmIdentifier=mid)
    seen["listed_after_retention"] = [
        i["microvmId"] for i in walk.call("ListMicrovms")["items"]
    ]

    # Tags, on the image's ARN.
    walk.call("TagResource", Resource=image_arn, Tags={"stage": "walk"})
    seen["tagged"] = walk.call("ListTags", Resource=image_arn).get("Tags")
    walk.call("UntagResource", Resource=image_arn, TagKeys=["stage"])
    seen["untagged"] = walk.call("ListTags", Resource=image_arn).get("Tags", {})
    missing_arn = image_arn.rsplit(":", 1)[0] + ":no-such-image"
    walk.fails("TagResource", "ValidationException", Resource=image_arn, Tags={"k": "bad*value"})
    walk.fails("UntagResource", "ResourceNotFoundException", Resource=missing_arn)
    walk.fails("ListTags", "ResourceNotFoundException", Resource=missing_arn)

    # Gone: a version, then the image.
    seen["deleted_version"] = walk.call("DeleteMicrovmImageVersion", **version_2)["state"]
    walk.fails(
        "DeleteMicrovmImageVersion",
        "ValidationException",
        saying="This is the last version. Please delete the entire image",
        **version_1,
    )
    seen["deleted_image"] = walk.call("DeleteMicrovmImage", imageIdentifier=IMAGE)["state"]


def main(api, endpoint_port, ca, zip_path):
    model = load_model()
    walk = Walk(api, model)
    seen = {}
    try:
        steps(walk, seen, endpoint_port, ca, zip_path)
    except Abort:
        pass
    except Exception:  # noqa: BLE001 - a bug in the walk itself still prints the report
        walk.failures.append("the walk itself failed:\n" + traceback.format_exc())
    print(
        json.dumps(
            {
                "model_operations": sorted(model.operation_names),
                "called": dict(sorted(walk.called.items())),
                "typed_errors": walk.typed_errors,
                "seen": seen,
                "failures": walk.failures,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
