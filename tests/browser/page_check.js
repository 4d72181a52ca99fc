// Drives the try-it page in Debian's headless Chromium like a person would, and prints one JSON object.
//   node page_check.js URL IMAGE CLASS SCREENSHOT.png   (CLASS: the hint to click)
const { chromium } = require('playwright-core');

const [url, image, cls, shot] = process.argv.slice(2);
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync'];

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: FLAGS });
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
  const out = {};
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById('bank').options.length > 0);
  out.bank_line = await page.textContent('#bank-line');
  out.hints = await page.$$eval('#classes-hint span', els => els.map(e => e.textContent));
  await page.click(`#classes-hint span >> text="${cls}"`);  // a click on a hint adds that class to the field
  out.classes_field = await page.inputValue('#classes');
  await page.setInputFiles('#image', image);
  await page.click('#go');
  await page.waitForSelector('#out:not([hidden])', { timeout: 60000 });
  out.legend = await page.$$eval('#legend li', els => els.map(e => e.textContent.trim()));
  out.timing = await page.textContent('#timing');
  out.overlay_size = await page.$eval('#overlay', img => [img.naturalWidth, img.naturalHeight]);
  await page.screenshot({ path: shot, fullPage: true });
  await page.fill('#classes', 'purple hexagon');  // a bad request shows its error
  await page.click('#go');
  await page.waitForFunction(() => document.getElementById('status').className === 'error');
  out.error = await page.textContent('#status');
  out.page_errors = errors;
  await browser.close();
  console.log(JSON.stringify(out));
})().catch(e => { console.error('page check failed:', e); process.exit(1); });
