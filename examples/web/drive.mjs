#!/usr/bin/env node
// Opens the page in headless Chromium (playwright-core, Debian's /usr/bin/chromium), waits for
// window.result, saves a screenshot and prints the result as one JSON line.
//
//   node examples/web/drive.mjs URL --user-data-dir DIR [--screenshot FILE] [--timeout 600]
//       [--chromium /usr/bin/chromium]
//
// The tests (tests/test_browser_app.py) and benchmarks/js_speed.py use it.

import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

// Background networking off: a closed network refuses those connections and Chromium retries.
const ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-quic",
];

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      "user-data-dir": { type: "string" },
      screenshot: { type: "string" },
      timeout: { type: "string", default: "600" },
      chromium: { type: "string", default: "/usr/bin/chromium" },
    },
  });
  if (positionals.length !== 1 || !values["user-data-dir"]) {
    console.error("usage: node drive.mjs URL --user-data-dir DIR [--screenshot FILE] [--timeout S]");
    process.exit(2);
  }
  const timeout = Number(values.timeout) * 1000;
  const context = await chromium.launchPersistentContext(values["user-data-dir"], {
    executablePath: values.chromium,
    headless: true,
    args: ARGS,
    viewport: { width: 960, height: 640 },
  });
  const messages = [];
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on("console", (message) => {
      if (message.type() === "error" || message.type() === "warning") {
        messages.push(`${message.type()}: ${message.text()}`);
      }
    });
    page.on("pageerror", (error) => messages.push(`pageerror: ${error.message}`));
    await page.goto(positionals[0], { waitUntil: "load" });
    await page.waitForFunction(() => window.result !== undefined, null, { timeout, polling: 200 });
    const result = await page.evaluate(() => window.result);
    if (values.screenshot) await page.screenshot({ path: values.screenshot, fullPage: true });
    console.log(JSON.stringify({ ...result, console: messages }));
  } finally {
    await context.close();
  }
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
