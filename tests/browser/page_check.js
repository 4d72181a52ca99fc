// Drives the try-it page in Debian's headless Chromium like a person would, and prints one JSON object.
//   node page_check.js URL IMAGE CLASS SCREENSHOT.png   (CLASS: a class to pick with the searchable picker)
const { chromium } = require('playwright-core');

const [url, image, cls, shot] = process.argv.slice(2);
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync'];

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: FLAGS });
  const page = await browser.newPage({ viewport: { width: 1300, height: 1000 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
  const out = {};
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById('bank').options.length > 0);
  out.before_result_hidden = await page.$eval('#out', el => getComputedStyle(el).display === 'none');
  out.bank_line = await page.textContent('#bank-line');
  out.picker = await page.$$eval('#class-list option', els => els.map(e => e.value));
  await page.waitForSelector('#examples button');
  out.examples = await page.$$eval('#examples button', els => els.map(e => e.textContent));
  // an example: segmented at once, shown beside its ground truth
  await page.click('#examples button >> nth=1');
  await page.waitForSelector('#out:not([hidden])', { timeout: 60000 });
  out.truth_shown = await page.$eval('#truth-fig', el => !el.hidden);
  out.example_legend = await page.$$eval('#legend li', els => els.map(e => e.textContent.trim()));
  // the searchable picker, then an upload
  await page.fill('#class-search', cls);
  await page.press('#class-search', 'Enter');
  out.chips = await page.$$eval('#chips span', els => els.map(e => e.textContent));
  await page.setInputFiles('#image', image);
  await page.click('#go');
  await page.waitForFunction(() => !document.getElementById('truth-fig').hidden === false &&
                                   document.getElementById('status').textContent === '', null, { timeout: 60000 });
  out.legend = await page.$$eval('#legend li', els => els.map(e => e.textContent.trim()));
  out.timing = await page.textContent('#timing');
  out.labels_size = await page.$eval('#labels', c => [c.width, c.height]);
  // hover over a pixel of the picked class: name, confidence, top-k; click: provenance
  const where = await page.evaluate((name) => {
    const c = document.getElementById('labels'), r = c.getBoundingClientRect();
    const ctx = c.getContext('2d');
    const li = [...document.querySelectorAll('#legend li')].find(e => e.textContent.trim() === name);
    if (!li) return null;
    const sw = getComputedStyle(li.querySelector('.sw')).backgroundColor.match(/\d+/g).map(Number);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < c.width * c.height; i++) {
      if (d[4 * i] === sw[0] && d[4 * i + 1] === sw[1] && d[4 * i + 2] === sw[2]) {
        const x = i % c.width, y = Math.floor(i / c.width);
        return [r.left + (x + 0.5) * r.width / c.width, r.top + (y + 0.5) * r.height / c.height];
      }
    }
    return null;
  }, cls);
  out.found_pixel = where !== null;
  if (where) {
    await page.mouse.move(where[0], where[1]);
    out.hover = await page.textContent('#hover');
    await page.mouse.click(where[0], where[1]);
    out.explain = await page.textContent('#explain');
  }
  await page.screenshot({ path: shot, fullPage: true });
  await page.fill('#class-search', 'purple hexagon');  // not a class: the picker says so
  await page.press('#class-search', 'Enter');
  out.picker_error = await page.textContent('#status');
  out.page_errors = errors;
  await browser.close();
  console.log(JSON.stringify(out));
})().catch(e => { console.error('page check failed:', e); process.exit(1); });
