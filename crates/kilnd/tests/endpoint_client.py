"""HTTPS requests to MicroVM endpoints, and the boto3 run → token → request → terminate flow.

Usage:
  endpoint_client.py get ENDPOINT_PORT CA_PEM MICROVM_ID PATH [TOKEN] [PORT_HEADER]
      prints "<status> <body>" for one request (Host <id>.kiln.localhost, to 127.0.0.1)
  endpoint_client.py flow API_URL ENDPOINT_PORT CA_PEM IMAGE
      runs the whole flow with boto3 and asserts each answer (signed with the default
      credentials: the caller sets AWS_SHARED_CREDENTIALS_FILE)
"""
import http.client
import ssl
import sys


def get(endpoint_port, ca, microvm_id, path, token=None, port_header=None):
    ctx = ssl.create_default_context(cafile=ca)
    # Clients that cannot resolve <id>.kiln.localhost connect to the listener and send the
    # Host header; the certificate also names 127.0.0.1.
    conn = http.client.HTTPSConnection("127.0.0.1", int(endpoint_port), context=ctx, timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", f"{microvm_id}.kiln.localhost:{endpoint_port}")
    if token:
        conn.putheader("X-aws-proxy-auth", token)
    if port_header:
        conn.putheader("X-aws-proxy-port", port_header)
    conn.endheaders()
    resp = conn.getresponse()
    return resp.status, resp.read().decode(errors="replace").strip()


def flow(api, endpoint_port, ca, image):
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "lambda-microvms",
        endpoint_url=api,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )
    vm = client.run_microvm(imageIdentifier=image, maximumDurationInSeconds=600)
    mid = vm["microvmId"]
    assert vm["state"] == "RUNNING", vm
    token = client.create_microvm_auth_token(
        microvmIdentifier=mid, expirationInMinutes=5, allowedPorts=[{"port": 8080}]
    )["authToken"]["X-aws-proxy-auth"]
    status, body = get(endpoint_port, ca, mid, "/cgi-bin/count", token)
    assert status == 200 and body == "101", (status, body)
    assert get(endpoint_port, ca, mid, "/cgi-bin/count")[0] == 403
    assert get(endpoint_port, ca, mid, "/cgi-bin/count", token, "9000")[0] == 403
    assert get(endpoint_port, ca, mid, "/cgi-bin/count", token + "x")[0] == 403
    # A token for one VM opens no other, known or not.
    assert get(endpoint_port, ca, "mvm-unknown", "/", token)[0] == 403
    try:
        client.create_microvm_auth_token(microvmIdentifier=mid, expirationInMinutes=61, allowedPorts=[{"port": 8080}])
        raise AssertionError("a 61-minute token was issued")
    except client.exceptions.ValidationException:
        pass
    client.terminate_microvm(microvmIdentifier=mid)
    assert client.get_microvm(microvmIdentifier=mid)["state"] == "TERMINATED"
    assert get(endpoint_port, ca, mid, "/cgi-bin/count", token)[0] in (404, 409)
    print("boto3 endpoint flow: ok")


if __name__ == "__main__":
    if sys.argv[1] == "get":
        status, body = get(*sys.argv[2:])
        print(status, body)
    else:
        flow(*sys.argv[2:])
