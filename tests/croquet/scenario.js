// The shared-counter scenario against a running `isthmus router`, with real Croquet and
// Multisynq clients (one Node process each). Run by tests/cli/croquet.rs:
//   node scenario.js http://127.0.0.1:PORT RUN_ID
// Prints one JSON line per finding and "PASS" at the end; exits non-zero on any failure.
const { spawn } = require("child_process");
const readline = require("readline");
const [base, runId, phase] = process.argv.slice(2);
const TIMEOUT = 30000;

function fail(msg) { console.log(JSON.stringify({ fail: msg })); process.exit(1); }
function note(o) { console.log(JSON.stringify(o)); }

class Client {
    constructor(lib, name, tag) {
        this.tag = tag; this.events = []; this.waiters = [];
        this.proc = spawn(process.execPath, [__dirname + "/client.js", lib, base, name, tag],
            { cwd: __dirname, stdio: ["pipe", "pipe", "inherit"] });
        readline.createInterface({ input: this.proc.stdout }).on("line", line => {
            let ev; try { ev = JSON.parse(line); } catch { return; }
            this.events.push(ev);
            if (ev.event === "error") fail(`${tag}: ${ev.message}`);
            this.waiters = this.waiters.filter(w => !w());
        });
        this.proc.on("exit", code => { if (code && !this.leaving) fail(`${tag} exited with ${code}`); });
    }
    send(cmd) { this.proc.stdin.write(cmd + "\n"); }
    count() { const c = this.events.filter(e => e.event === "count"); return c.length ? c[c.length - 1].count : -1; }
    all(kind) { return this.events.filter(e => e.event === kind); }
    until(what, pred) {
        return new Promise(resolve => {
            const check = () => { if (pred()) { resolve(); return true; } return false; };
            if (check()) return;
            this.waiters.push(check);
            setTimeout(() => { if (!pred()) fail(`${this.tag}: timed out waiting for ${what}; events ${JSON.stringify(this.events.slice(-8))}`); }, TIMEOUT);
        });
    }
    async leave() { this.leaving = true; this.send("leave"); await this.until("left", () => this.all("left").length > 0); }
}

const sleep = ms => new Promise(r => setTimeout(r, ms));

async function library(lib) {
    const name = `counter-${lib}-${runId}`;
    const a = new Client(lib, name, `${lib}-1`);
    const b = new Client(lib, name, `${lib}-2`);
    await a.until("join", () => a.all("joined").length > 0);
    await b.until("join", () => b.all("joined").length > 0);
    if (a.all("joined")[0].id !== b.all("joined")[0].id) fail(`${lib}: two clients in different sessions`);
    // Clients vote (on persistence, snapshots) only once they call themselves synced, a moment
    // after SYNC: the first click persists the count for the next session.
    await sleep(1500);
    // Both click, interleaved.
    for (let i = 0; i < 5; i++) { a.send("inc"); b.send("inc"); await sleep(30); }
    await a.until("count 10", () => a.count() === 10);
    await b.until("count 10", () => b.count() === 10);
    note({ lib, step: "two clients in sync", count: 10 });

    // A snapshot, then more clicks: a late joiner starts from the snapshot, not from a replay.
    // (Clients refuse snapshot polls in the first 5 s of session time.)
    await sleep(5500);
    a.send("snap");
    await Promise.race([a, b].map(c => c.until("snapshot upload", () => [a, b].some(x => x.all("snap-sent").length > 0))));
    await sleep(500);
    for (let i = 0; i < 3; i++) { b.send("inc"); await sleep(30); }
    await a.until("count 13", () => a.count() === 13);
    const late = new Client(lib, name, `${lib}-late`);
    await late.until("count 13", () => late.count() === 13);
    const sync = late.all("sync")[0];
    if (!sync || !sync.url || sync.persisted) fail(`${lib}: late joiner got no snapshot: ${JSON.stringify(sync)}`);
    // 13 clicks were sent before it joined; from the snapshot it replays only what came after.
    if (sync.messages >= 13) fail(`${lib}: late joiner replayed ${sync.messages} messages despite a snapshot`);
    note({ lib, step: "late joiner started from the snapshot", url: sync.url, replayed: sync.messages });

    // A client cut off for a moment (no close handshake) rejoins seamlessly: same timeline, no
    // new view (a reboot would make one), and it ends at the same count.
    b.send("drop");
    await sleep(200);
    a.send("inc"); a.send("inc");
    await b.until("two syncs", () => b.all("sync").length >= 2);
    await b.until("count 15", () => b.count() === 15);
    await a.until("count 15", () => a.count() === 15);
    await late.until("count 15", () => late.count() === 15);
    const syncs = b.all("sync");
    if (syncs[0].timeline !== syncs[1].timeline) fail(`${lib}: the timeline changed across a reconnect`);
    if (b.all("view").length !== 1) fail(`${lib}: the cut-off client rebooted instead of rejoining seamlessly`);
    const closes = b.all("closed").map(e => e.code);
    note({ lib, step: "cut-off client rejoined seamlessly", closes });
    // Everyone still agrees after one more click from the rejoined client.
    b.send("inc");
    for (const c of [a, b, late]) await c.until("count 16", () => c.count() === 16);
    note({ lib, step: "all agree", count: 16 });
    for (const c of [a, b, late]) await c.leave();
}

// Phase "persisted": the sessions above have ended; a new session of the same app starts from
// the persistent data its clients saved (SAVE), not from zero.
async function persisted(lib) {
    const c = new Client(lib, `counter-${lib}-${runId}`, `${lib}-next`);
    await c.until("count", () => c.count() > 0);
    const sync = c.all("sync")[0];
    if (!sync || !sync.persisted || !sync.url) fail(`${lib}: new session did not start from persisted data: ${JSON.stringify(sync)}`);
    note({ lib, step: "new session started from persisted data", count: c.count() });
    await c.leave();
}

(async () => {
    const run = phase === "persisted" ? persisted : library;
    await Promise.all([run("croquet"), run("multisynq")]);
    console.log("PASS");
    process.exit(0);
})();
