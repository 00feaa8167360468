// E2B's JS SDK (npm `e2b`) against kilnd: create from base, run, kill. The environment comes
// from `kiln e2b env`.
import { Sandbox } from 'e2b'

const sbx = await Sandbox.create('base', { timeoutMs: 300_000, requestTimeoutMs: 1_800_000 })
const r = await sbx.commands.run('echo from-js; python3 -c "print(2+3)"')
if (r.stdout !== 'from-js\n5\n') throw new Error(`stdout: ${JSON.stringify(r.stdout)}`)
await sbx.kill()
const left = await Sandbox.list().nextItems()
if (left.some((s) => s.sandboxId === sbx.sandboxId)) throw new Error('killed sandbox still listed')
console.log('JS OK')
