// One Croquet or Multisynq client in Node, driven over stdin/stdout by scenario.js.
// Usage: node client.js croquet|multisynq REFLECTOR_BASE SESSION_NAME TAG
// stdin lines: "inc", "snap" (force a snapshot), "leave"; stdout: JSON lines.
globalThis.window = { location: "http://localhost/" }; // else snapshot uploads fail in Node
const [lib, base, name, tag] = process.argv.slice(2);
const L = require(lib === "croquet" ? "@croquet/croquet" : "@multisynq/client");
const defineCounter = require("./counter.js");
const out = o => process.stdout.write(JSON.stringify({ tag, ...o }) + "\n");
let view = null;
let lastCount = -1;
const { Counter, CounterView } = defineCounter(L, (count, v) => {
    if (view !== v) out({ event: "view" }); // a new view: first start, or a reboot (not seamless)
    view = v;
    if (count !== lastCount) { lastCount = count; out({ event: "count", count }); }
});

// Record what the reflector sent: the SYNC (snapshot URL, replayed messages) and close codes.
const WS = require("ws");
class Spy extends WS {
    constructor(url, ...rest) {
        super(url, ...rest);
        this.addEventListener("message", ev => {
            const data = String(ev.data);
            if (data.includes('"action":"SYNC"')) {
                const { args } = JSON.parse(data);
                out({ event: "sync", url: args.url, messages: args.messages.length, seq: args.seq,
                      snapshotSeq: args.snapshotSeq, persisted: !!args.persisted, timeline: args.timeline });
            }
        });
        this.addEventListener("close", ev => out({ event: "closed", code: ev.code }));
        this.addEventListener("open", () => out({ event: "open" }));
        Spy.last = this;
    }
    send(data, ...rest) {
        if (String(data).includes('"action":"SNAP"')) out({ event: "snap-sent" });
        super.send(data, ...rest);
    }
}
globalThis.WebSocket = Spy;

(async () => {
    const session = await L.Session.join({
        apiKey: "isthmus-test-key", appId: "io.isthmus.counter", name, password: "secret",
        model: Counter, view: CounterView, step: "manual",
        reflector: base + "/reflector", files: base + "/files",
        rejoinLimit: 5000,
    });
    out({ event: "joined", id: session.id });
    setInterval(() => session.step(performance.now()), 10);
    require("readline").createInterface({ input: process.stdin }).on("line", line => {
        const cmd = line.trim();
        if (cmd === "inc") view.inc();
        // "snap" asks for a snapshot now (as clients do by themselves after enough CPU time).
        else if (cmd === "snap") view.realm.vm.forceSnapshot();
        else if (cmd === "drop") Spy.last.terminate(); // cut off without a close handshake
        else if (cmd === "leave") session.leave().then(() => { out({ event: "left" }); process.exit(0); });
    });
})().catch(e => { out({ event: "error", message: String(e && e.stack || e) }); process.exit(1); });
