// Opens the customer tracking page in Chromium at a phone's size and follows one
// delivery until it is Completed.
//
//   node tests/browser/track.mjs <pageUrl> <screenshotPath> <timeoutMs>
//
// Prints one JSON line: {"ok","stages","markerMoves","timeline","overflow","errors"};
// exits 0 when the page reached Completed and the drone marker moved, 1 otherwise.
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { chromium } from 'playwright-core';

const [pageUrl, screenshotPath, timeoutArg] = process.argv.slice(2);
const timeoutMs = Number(timeoutArg);
if (!pageUrl || !screenshotPath || !Number.isFinite(timeoutMs) || timeoutMs <= 0) {
  console.error('usage: node track.mjs <pageUrl> <screenshotPath> <timeoutMs>');
  process.exit(2);
}

const started = Date.now();
// Time kept back for the screenshot and closing the browser.
const reserve = Math.min(5000, Math.floor(timeoutMs / 4));
const deadline = started + timeoutMs - reserve;
const remaining = () => Math.max(1, deadline - Date.now());
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const result = { ok: false, stages: [], markerMoves: 0, timeline: 0, overflow: false, errors: [] };
let pageErrors = 0;
let printed = false;
function finish(ok) {
  if (printed) return;
  printed = true;
  result.ok = ok;
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

// Last resort if the browser hangs past every bound below.
const watchdog = setTimeout(() => {
  result.errors.push('check: overall timeout exceeded');
  finish(false);
  process.exit(1);
}, timeoutMs + 3000);
watchdog.unref();

let browser;
let page;
let ok = false;
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    timeout: remaining(),
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
  });
  page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') result.errors.push(`console: ${msg.text()}`);
  });
  page.on('pageerror', (err) => {
    pageErrors += 1;
    result.errors.push(`pageerror: ${err.message}`);
  });

  await page.goto(pageUrl, { waitUntil: 'domcontentloaded', timeout: remaining() });
  await page.waitForFunction(
    () => (document.getElementById('stage')?.textContent || '').trim() !== '',
    null,
    { timeout: remaining(), polling: 100 },
  );

  const sample = () => page.evaluate(() => {
    const m = document.getElementById('drone-marker');
    const err = document.getElementById('error');
    return {
      stage: (document.getElementById('stage')?.textContent || '').trim(),
      cx: m ? m.getAttribute('cx') : null,
      cy: m ? m.getAttribute('cy') : null,
      marker: Boolean(m),
      error: Boolean(err && !err.hidden),
      overflow: document.documentElement.scrollWidth > window.innerWidth + 1,
    };
  });

  let s = await sample();
  let pos = `${s.cx},${s.cy}`;
  let marker = s.marker;
  let errorShown = s.error;
  result.overflow = s.overflow;
  result.stages.push(s.stage);
  while (Date.now() < deadline) {
    await sleep(Math.min(200, remaining()));
    s = await sample();
    marker &&= s.marker;
    errorShown ||= s.error;
    result.overflow ||= s.overflow;
    if (s.stage && !result.stages.includes(s.stage)) result.stages.push(s.stage);
    const now = `${s.cx},${s.cy}`;
    if (s.marker && now !== pos) {
      result.markerMoves += 1;
      pos = now;
    }
    if (errorShown || s.stage === 'Cancelled') break;
    if (s.stage === 'Completed' && result.markerMoves > 0) break;
  }
  // Let the last layout settle before the final checks.
  await sleep(Math.min(300, remaining()));
  const end = await sample();
  result.overflow ||= end.overflow;
  result.timeline = await page.locator('#timeline > li').count();
  const named = await page.getByRole('img', { name: /\S/ })
    .filter({ has: page.locator('#drone-marker') }).count();

  if (!marker) result.errors.push('check: #drone-marker missing');
  if (named === 0) result.errors.push('check: the map has no accessible name');
  if (result.overflow) result.errors.push('check: horizontal overflow');
  if (errorShown) result.errors.push('check: the page shows its error state');
  if (end.stage !== 'Completed') result.errors.push(`check: stage is ${end.stage || 'empty'}, not Completed`);
  if (result.markerMoves === 0) result.errors.push('check: the drone marker never moved');
  ok = end.stage === 'Completed' && result.markerMoves > 0 && marker && named > 0 &&
    !result.overflow && !errorShown && pageErrors === 0;
} catch (e) {
  result.errors.push(`check: ${String(e && e.message ? e.message : e).split('\n')[0]}`);
  ok = false;
} finally {
  if (page) {
    try {
      mkdirSync(dirname(screenshotPath), { recursive: true });
      await page.screenshot({ path: screenshotPath, fullPage: true, timeout: Math.max(1000, reserve - 1000) });
    } catch (e) {
      result.errors.push(`check: screenshot failed: ${String(e.message || e).split('\n')[0]}`);
    }
  }
  if (browser) {
    await Promise.race([browser.close().catch(() => {}), sleep(2000)]);
  }
}
finish(ok && pageErrors === 0);
process.exit(result.ok ? 0 : 1);
