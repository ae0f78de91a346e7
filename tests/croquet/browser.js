// The counter app served by `isthmus router --web DIR`, opened twice in headless Chromium
// (Debian's, through playwright-core; no browser download). A click in one page must show in
// the other. Usage: node browser.js http://127.0.0.1:PORT/?session=NAME OUT_DIR
const { chromium } = require("playwright-core");
const fs = require("fs");
const path = require("path");
const [url, outDir] = process.argv.slice(2);
const TIMEOUT = 30000;

(async () => {
    const browser = await chromium.launch({
        executablePath: "/usr/bin/chromium",
        headless: true,
        // playwright gives every launch a fresh temporary profile (--user-data-dir).
        args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    try {
        const pages = [];
        for (let i = 0; i < 2; i++) {
            const ctx = await browser.newContext({ viewport: { width: 640, height: 420 } });
            const page = await ctx.newPage();
            page.on("console", m => { if (m.type() === "error") console.log(`page ${i}: ${m.text()}`); });
            await page.goto(url);
            pages.push(page);
        }
        for (const p of pages) await p.waitForFunction(() => document.getElementById("status").textContent.startsWith("joined"), null, { timeout: TIMEOUT });
        const count = p => p.$eval("#count", e => e.textContent);
        const before = Number(await count(pages[1]));
        await pages[0].click("#inc");
        await pages[1].waitForFunction(n => Number(document.getElementById("count").textContent) === n, before + 1, { timeout: TIMEOUT });
        await pages[1].click("#inc");
        await pages[0].waitForFunction(n => Number(document.getElementById("count").textContent) === n, before + 2, { timeout: TIMEOUT });
        fs.mkdirSync(outDir, { recursive: true });
        const shots = [];
        for (let i = 0; i < 2; i++) {
            const file = path.join(outDir, `counter-${i + 1}.png`);
            await pages[i].screenshot({ path: file });
            shots.push(fs.readFileSync(file).toString("base64"));
        }
        // Both windows side by side in one picture.
        const ctx = await browser.newContext({ viewport: { width: 1300, height: 440 } });
        const page = await ctx.newPage();
        await page.setContent(`<body style="margin:0;background:#333;display:flex;gap:20px;padding:10px">` +
            shots.map(s => `<img src="data:image/png;base64,${s}" style="border:1px solid #999">`).join("") + `</body>`);
        await page.screenshot({ path: path.join(outDir, "counter-both.png") });
        console.log(JSON.stringify({ before, after: before + 2, pages: [await count(pages[0]), await count(pages[1])] }));
        console.log("PASS");
    } finally {
        await browser.close();
    }
})().catch(e => { console.log(`FAIL ${e && e.stack || e}`); process.exit(1); });
