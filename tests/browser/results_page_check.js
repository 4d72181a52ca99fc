// Opens the demo's results page (a static file) in Debian's headless Chromium and prints one JSON object: every
// image with its naturalWidth, the classes on the per-class IoU chart in order, the headline, page errors.
//   node results_page_check.js /path/to/index.html
const { chromium } = require('playwright-core');
const { pathToFileURL } = require('url');

const [page_path] = process.argv.slice(2);
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
               '--disable-component-update', '--disable-sync'];

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: FLAGS });
  const page = await browser.newPage({ viewport: { width: 1300, height: 1000 } });
  const errors = [];
  const requests = [];
  page.on('pageerror', e => errors.push(String(e)));
  page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
  page.on('request', r => requests.push(r.url()));
  await page.goto(pathToFileURL(page_path).href, { waitUntil: 'load' });
  const out = {};
  out.images = await page.$$eval('img', els => els.map(e => ({ src: e.getAttribute('src'), complete: e.complete,
                                                                natural_width: e.naturalWidth })));
  out.chart = await page.$$eval('#chart li', els => els.map(e => [e.dataset.class, e.dataset.iou]));
  out.bar_widths = await page.$$eval('#chart li .fill', els => els.map(e => e.getBoundingClientRect().width));
  out.track_widths = await page.$$eval('#chart li .track', els => els.map(e => e.getBoundingClientRect().width));
  out.headline = await page.textContent('#headline');
  out.scenes = await page.$$eval('section.scene', els => els.length);
  out.non_file_requests = requests.filter(u => !u.startsWith('file:'));
  out.errors = errors;
  console.log(JSON.stringify(out));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
