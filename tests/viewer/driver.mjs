// Drive headless Debian Chromium with playwright-core, one JSON command per stdin line, one JSON
// answer per stdout line ({"ok": true, "result": ...} or {"ok": false, "error": "..."}).
// Started by tests/viewer/browser.py; NODE_PATH points at tests/.cache/.../node_modules.
import { createInterface } from 'node:readline';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

const options = JSON.parse(process.argv[2] || '{}');
const browser = await chromium.launch({
  executablePath: options.executablePath || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--use-angle=swiftshader',
    '--enable-unsafe-swiftshader', '--disable-dev-shm-usage',
  ],
});
const context = await browser.newContext({
  viewport: options.viewport || { width: 1400, height: 900 },
  deviceScaleFactor: 1,
  // HTTP basic credentials answered to a 401 challenge (the node's dashboard), if given.
  ...(options.httpCredentials ? { httpCredentials: options.httpCredentials } : {}),
});
// OHIF's onboarding tour (Shepherd) covers the viewer and swallows clicks.
await context.addInitScript(() => {
  const style = document.createElement('style');
  style.textContent = '.shepherd-element, .shepherd-modal-overlay-container { display: none !important; }';
  document.addEventListener('DOMContentLoaded', () => document.head.appendChild(style));
});
let page = await context.newPage();
const messages = [];
function listen(p) {
  p.on('console', (m) => messages.push({ type: m.type(), text: m.text().slice(0, 500) }));
  p.on('pageerror', (e) => messages.push({ type: 'pageerror', text: String(e).slice(0, 500) }));
}
listen(page);

const commands = {
  goto: async (c) => { await page.goto(c.url, { timeout: c.ms || 60000, waitUntil: 'domcontentloaded' }); },
  wait: async (c) => { await page.waitForSelector(c.selector, { state: c.state || 'visible', timeout: c.ms || 60000 }); },
  count: async (c) => page.locator(c.selector).count(),
  click: async (c) => { await page.locator(c.selector).first().click({ timeout: c.ms || 30000 }); },
  // Click a link that opens a new tab (target=_blank); later commands act on the new tab.
  click_popup: async (c) => {
    const [popup] = await Promise.all([
      context.waitForEvent('page', { timeout: c.ms || 30000 }),
      page.locator(c.selector).first().click({ timeout: c.ms || 30000 }),
    ]);
    await popup.waitForLoadState('domcontentloaded');
    listen(popup);
    page = popup;
    return popup.url();
  },
  dblclick: async (c) => { await page.locator(c.selector).first().dblclick({ timeout: c.ms || 30000 }); },
  press: async (c) => { await page.keyboard.press(c.key); },
  mouse_move: async (c) => { await page.mouse.move(c.x, c.y); },
  box: async (c) => page.locator(c.selector).first().boundingBox({ timeout: c.ms || 30000 }),
  text: async (c) => page.locator(c.selector).allInnerTexts(),
  eval: async (c) => page.evaluate(c.expr),
  wait_for: async (c) => { await page.waitForFunction(c.expr, null, { timeout: c.ms || 60000, polling: 250 }); },
  sleep: async (c) => { await page.waitForTimeout(c.ms); },
  screenshot: async (c) => { await page.screenshot({ path: c.path, clip: c.clip, animations: 'disabled' }); return c.path; },
  console: async () => messages.splice(0, messages.length),
  close: async () => { await browser.close(); },
};

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let command;
  try {
    command = JSON.parse(line);
    const fn = commands[command.cmd];
    if (!fn) throw new Error(`unknown command ${command.cmd}`);
    const result = await fn(command);
    process.stdout.write(JSON.stringify({ ok: true, result: result === undefined ? null : result }) + '\n');
    if (command.cmd === 'close') break;
  } catch (e) {
    process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.message || e).slice(0, 2000) }) + '\n');
  }
}
await browser.close().catch(() => {});
process.exit(0);
