// Drives the bank view (/bank) in Debian's headless Chromium and prints one JSON object.
//   node bank_check.js URL SEARCH SCREENSHOT.png   (URL: the service root; SEARCH: a word to search the classes by)
const { chromium } = require('playwright-core');

const [url, search, shot] = process.argv.slice(2);
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
               '--disable-background-networking', '--disable-component-update', '--disable-sync'];

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: FLAGS });
  const page = await browser.newPage({ viewport: { width: 1300, height: 300 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
  const tiles = [];
  page.on('request', r => { if (/\/support\/\d+\.png/.test(r.url())) tiles.push(r.url()); });
  const out = {};
  // from the try-it page's link, 4 classes a page
  await page.goto(url);
  out.link = await page.getAttribute('a[href="bank"]', 'href');
  await page.goto(url + 'bank?limit=8');
  await page.waitForFunction(() => document.querySelectorAll('#rows tr').length > 0 &&
                                   document.getElementById('audit').textContent === '', null, { timeout: 60000 });
  out.bank_line = await page.textContent('#bank-line');
  out.page1 = await page.textContent('#page');
  out.rows1 = await page.$$eval('#rows tr', els => els.map(e => e.dataset.name));
  out.scores = await page.$$eval('#rows td.score', els => els.map(e => e.textContent));
  // thumbnails: the first row's strip loads; the last row (below the fold) waits until it is scrolled to
  await page.waitForFunction(() => document.querySelector('#rows tr .strip img') !== null, null, { timeout: 30000 });
  await page.waitForTimeout(500);
  out.last_row_imgs_before_scroll = await page.$$eval('#rows tr:last-child .strip img', els => els.length);
  out.tiles_before_scroll = tiles.length;
  await page.$eval('#rows tr:last-child', el => el.scrollIntoView());
  await page.waitForFunction(() => document.querySelectorAll('#rows tr:last-child .strip img').length > 0, null,
                             { timeout: 30000 });
  await page.waitForFunction(() => [...document.querySelectorAll('#rows tr:last-child .strip img')]
                                     .every(i => i.complete && i.naturalWidth > 0), null, { timeout: 30000 });
  out.last_row_imgs_after_scroll = await page.$$eval('#rows tr:last-child .strip img', els => els.length);
  out.tile_size = await page.$eval('#rows tr:last-child .strip img', i => [i.naturalWidth, i.naturalHeight]);
  out.titles = await page.$eval('#rows tr:last-child .strip img', i => i.title);
  // the next page
  await page.click('#next');
  await page.waitForFunction((first) => document.querySelector('#rows tr') &&
                             document.querySelector('#rows tr').dataset.name !== first, out.rows1[0]);
  out.page2 = await page.textContent('#page');
  out.rows2 = await page.$$eval('#rows tr', els => els.map(e => e.dataset.name));
  // search
  await page.fill('#q', search);
  await page.waitForFunction((s) => [...document.querySelectorAll('#rows tr')].every(
      e => e.dataset.name.includes(s)), search, { timeout: 10000 });
  await page.waitForTimeout(400);
  out.search_rows = await page.$$eval('#rows tr', els => els.map(e => e.dataset.name));
  out.search_page = await page.textContent('#page');
  await page.setViewportSize({ width: 1300, height: 900 });
  await page.screenshot({ path: shot, fullPage: true });
  out.page_errors = errors;
  console.log(JSON.stringify(out));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
