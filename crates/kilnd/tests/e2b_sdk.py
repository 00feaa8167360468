# Drives kilnd with E2B's own Python SDK, unchanged: the environment comes from `kiln e2b env`
# (E2B_API_URL, E2B_API_KEY, E2B_DOMAIN, E2B_SANDBOX_URL, SSL_CERT_FILE); OTHER_E2B_API_KEY is
# a second principal's key. Every check raises with what it saw.
import asyncio
import json
import os
import ssl
import time
import urllib.request

from e2b import AsyncSandbox, PtySize, Sandbox
from e2b.exceptions import NotFoundException, SandboxException
from e2b.sandbox.commands.command_handle import CommandExitException


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split(":")[0], flush=True)


# The first use of `base` builds it: allow the build its minutes.
t = time.time()
sbx = Sandbox.create("base", timeout=900, metadata={"suite": "e2b"}, envs={"GREETING": "hi"},
                     request_timeout=1800)
print(f"created {sbx.sandbox_id} in {time.time() - t:.1f} s", flush=True)
check(sbx.sandbox_id.isalnum() and sbx.sandbox_id == sbx.sandbox_id.lower(), f"sandbox id is [a-z0-9]: {sbx.sandbox_id}")

r = sbx.commands.run("echo out; echo err >&2; echo $GREETING; python3 -c 'print(6*7)'; whoami")
check(r.stdout.split() == ["out", "hi", "42", "user"], f"stdout, envVars, python3, default user: {r.stdout!r}")
check(r.stderr == "err\n", f"stderr: {r.stderr!r}")
check(r.exit_code == 0, f"exit code 0: {r.exit_code}")

try:
    sbx.commands.run("echo failing; exit 3")
    raise AssertionError("a non-zero exit raises")
except CommandExitException as e:
    check(e.exit_code == 3 and "failing" in e.stdout, f"non-zero exit raises with its exit_code: {e.exit_code}")

# stdin to a background process.
h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "hello\n")
check(h.wait().stdout.strip() == "got:hello", "stdin reaches a background process")

# A background process that keeps counting across pause and resume.
counter = sbx.commands.run("i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 1; done", background=True)
check(any(p.pid == counter.pid for p in sbx.commands.list()), "the background process is listed")

sbx.files.write("/home/user/notes/a.txt", "first file")
sbx.files.write_files([{"path": "/home/user/notes/b.bin", "data": bytes(range(256)) * 400}])
check(sbx.files.read("/home/user/notes/a.txt") == "first file", "files.write then read")
check(sbx.files.read("/home/user/notes/b.bin", format="bytes") == bytes(range(256)) * 400, "a 100 KiB binary file round-trips")
names = sorted(e.name for e in sbx.files.list("/home/user/notes"))
check(names == ["a.txt", "b.bin"], f"files.list: {names}")
sbx.files.write("/home/user/notes/gone.txt", "x")
sbx.files.remove("/home/user/notes/gone.txt")
check(not sbx.files.exists("/home/user/notes/gone.txt"), "files.remove")

# Watching a directory: the polled watcher (the sync SDK) and the streamed WatchDir (async).
watch = sbx.files.watch_dir("/home/user/notes")
sbx.files.write("/home/user/notes/c.txt", "watched")
time.sleep(1)
events = watch.get_new_events()
watch.stop()
check(any(e.name == "c.txt" for e in events), f"a polled watcher sees a new file: {events}")


async def streamed_watch():
    a = await AsyncSandbox.connect(sbx.sandbox_id)
    seen = []
    handle = await a.files.watch_dir("/home/user/notes", on_event=seen.append)
    await a.files.write("/home/user/notes/d.txt", "streamed")
    for _ in range(50):
        if any(e.name == "d.txt" for e in seen):
            break
        await asyncio.sleep(0.1)
    await handle.stop()
    return seen


seen = asyncio.run(streamed_watch())
check(any(e.name == "d.txt" for e in seen), f"a streamed WatchDir sees a new file: {seen}")

# A terminal: input, a resize (Process.Update) and its output.
term = sbx.pty.create(PtySize(rows=24, cols=80))
sbx.pty.resize(term.pid, PtySize(rows=30, cols=101))
sbx.pty.send_stdin(term.pid, b"stty size; tty; exit 0\n")
chunks = []
try:
    term.wait(on_pty=chunks.append)
except CommandExitException:
    pass
screen = b"".join(chunks).decode(errors="replace")
check("30 101" in screen and "/dev/pts/" in screen, f"a terminal answers, resized: {screen!r}")

# Attaching to a process that is already running (Process.Connect).
later = sbx.commands.run("sleep 2; echo done-later", background=True)
attached = sbx.commands.connect(later.pid).wait()
check(attached.stdout.strip() == "done-later", f"commands.connect follows a running process: {attached.stdout!r}")

# The proxy refuses an attacker who routes to the sandbox without its access token.
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
for token in (None, "0" * 48):
    req = urllib.request.Request(os.environ["E2B_SANDBOX_URL"] + "/envs",
                                 headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983",
                                          **({"X-Access-Token": token} if token else {})})
    try:
        urllib.request.urlopen(req, context=ctx)
        raise AssertionError(f"envd answered without the sandbox's token ({token!r})")
    except urllib.error.HTTPError as e:
        check(e.code == 403, f"no envd without the access token: {e.code}")

# From inside the guest, as its unprivileged user: envd on loopback wants the token too
# (it had it from its start), and the token is nowhere in the environment envd gave.
probe = sbx.commands.run(
    "python3 - <<'EOF'\n"
    "import os, urllib.request, urllib.error\n"
    "print('token in env:', any('ENVD' in k for k in os.environ))\n"
    "for path in ('/envs', '/init'):\n"
    "    try:\n"
    "        r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:49983' + path, data=b'{}' if path == '/init' else None, headers={'Content-Type': 'application/json'}))\n"
    "        print(path, r.status)\n"
    "    except urllib.error.HTTPError as e:\n"
    "        print(path, e.code)\n"
    "EOF"
)
check(probe.stdout.split() == ["token", "in", "env:", "False", "/envs", "401", "/init", "401"],
      f"a guest user gets nothing from envd without the token: {probe.stdout!r}")

other = os.environ["OTHER_E2B_API_KEY"]
check(Sandbox.list(api_key=other).next_items() == [], "a second principal lists none of it")
try:
    Sandbox.connect(sbx.sandbox_id, api_key=other)
    raise AssertionError("the second principal connected")
except (NotFoundException, SandboxException) as e:
    check("not found" in str(e).lower(), f"a second principal cannot connect: {e}")

listed = Sandbox.list().next_items()
check([s.sandbox_id for s in listed] == [sbx.sandbox_id] and listed[0].metadata == {"suite": "e2b"},
      f"Sandbox.list() shows it with its metadata: {listed}")

time.sleep(3)
before = int(sbx.files.read("/tmp/count"))
sbx.pause()
# The SDK treats a 409 as "already paused"; ask the API itself.
req = urllib.request.Request(f"{os.environ['E2B_API_URL']}/sandboxes/{sbx.sandbox_id}/pause", method="POST",
                             headers={"X-API-Key": os.environ["E2B_API_KEY"]})
try:
    urllib.request.urlopen(req)
    raise AssertionError("pausing a paused sandbox succeeded")
except urllib.error.HTTPError as e:
    check(e.code == 409, f"pausing twice is a conflict: {e.code}")
check(Sandbox.list(query=None).next_items()[0].state.value == "paused", "the list shows it paused")

again = Sandbox.connect(sbx.sandbox_id)
check(again.files.read("/home/user/notes/a.txt") == "first file", "files intact after pause and connect")
time.sleep(3)
after = int(again.files.read("/tmp/count"))
check(after > before, f"the background process kept counting: {before} -> {after}")
info = again.get_info()
check(info.end_at.timestamp() > time.time() + 600, f"connect did not shorten the timeout: {info.end_at}")

metrics = again.get_metrics()
check(isinstance(metrics, list), f"the sandbox's metrics: {metrics!r}")
again.kill()
check(Sandbox.list().next_items() == [], "kill removes it")

# E2B's timeout: a sandbox past its end is killed, or paused when it asked for autoPause
# (sent through the API itself: the SDK's name for it differs between versions).
short = Sandbox.create("base", timeout=3)
create = urllib.request.Request(
    f"{os.environ['E2B_API_URL']}/sandboxes",
    data=json.dumps({"templateID": "base", "timeout": 3, "autoPause": True}).encode(),
    method="POST",
    headers={"X-API-Key": os.environ["E2B_API_KEY"], "Content-Type": "application/json"},
)
keeper = json.load(urllib.request.urlopen(create))["sandboxID"]
deadline = time.time() + 90
while time.time() < deadline:
    states = {s.sandbox_id: s.state.value for s in Sandbox.list(query=None).next_items()}
    if short.sandbox_id not in states and states.get(keeper) == "paused":
        break
    time.sleep(1)
check(short.sandbox_id not in states, f"the timeout killed a sandbox: {states}")
check(states.get(keeper) == "paused", f"the timeout paused the autoPause one: {states}")
Sandbox.kill(keeper)
print("ALL OK", flush=True)
