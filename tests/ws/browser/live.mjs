// Drives headless Chromium (Debian's /usr/bin/chromium) through the live dashboard page.
//   node live.mjs <page url> <screenshot path> <rows to wait for>
// Prints READY once the page's WebSocket is open (the test then publishes), waits until the
// page shows the rows, saves a screenshot and prints the rows as one JSON line.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, screenshot, want] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "conduit-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1200, height: 420 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = context.pages()[0] || await context.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("console", (msg) => { if (msg.type() === "error") errors.push(msg.text()); });
  await page.goto(url);
  await page.waitForSelector("#status[data-state=open]", { timeout: 15000 });
  console.log("READY");
  await page.waitForFunction(
    (n) => document.querySelectorAll("#messages tr").length >= n, Number(want), { timeout: 15000 });
  await page.waitForTimeout(1600);  // let the row highlight fade before the screenshot
  await page.screenshot({ path: screenshot });
  const result = await page.evaluate(() => ({
    status: document.getElementById("status").textContent,
    count: document.getElementById("count").textContent,
    address: location.href,
    rows: [...document.querySelectorAll("#messages tr")].map(
      (tr) => [...tr.children].map((td) => td.textContent)),
  }));
  console.log(JSON.stringify({ ...result, errors }));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
