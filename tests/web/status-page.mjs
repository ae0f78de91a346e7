// Opens the router's status page in Debian's headless Chromium and reports what it sees, as
// one JSON line on stdout: the test (tests/cli/status.rs) judges it.
//
// usage: node status-page.mjs URL SCREENSHOT NAME...
// Waits until every NAME is on the page and the first island's seq has risen without a reload
// (the page's own polling), takes the screenshot, then loads the page once more with
// JavaScript off to see that the server-rendered page shows the names too.
import { chromium } from "playwright-core";

const [url, screenshot, ...names] = process.argv.slice(2);
const patience = 60_000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Without the background-networking flags Chromium hangs on a closed network.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const result = { names: [], seq_before: null, seq_after: null, postcard: null, nojs_names: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 760 } });
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(
    (names) => names.every((n) => document.querySelector("#live").innerText.includes(n)),
    names,
    { timeout: patience },
  );
  const seq = () => page.$eval(".island .seq", (e) => parseInt(e.textContent, 10));
  result.seq_before = await seq();
  await page.waitForFunction(
    (before) => parseInt(document.querySelector(".island .seq").textContent, 10) > before,
    result.seq_before,
    { timeout: patience },
  );
  result.seq_after = await seq();
  const text = await page.$eval("#live", (e) => e.innerText);
  result.names = names.filter((n) => text.includes(n));
  result.postcard = await page.$eval(".postcard textarea", (e) => e.value).catch(() => null);
  await page.screenshot({ path: screenshot, fullPage: true });

  const nojs = await browser.newContext({ javaScriptEnabled: false });
  const plain = await nojs.newPage();
  await plain.goto(url, { waitUntil: "load" });
  const plainText = await plain.$eval("#live", (e) => e.innerText);
  result.nojs_names = names.filter((n) => plainText.includes(n));
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
