// Copies what the dashboard (api/static/dashboard/) serves from this package: the client itself and
// uPlot from node_modules with its licence. Run after `npm ci`: `npm run vendor`. The copies are committed,
// so the server needs no Node and the page loads nothing from elsewhere.
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = join(here, '..');
const target = join(pkg, '..', '..', 'api', 'static', 'dashboard');
const uplot = join(pkg, 'node_modules', 'uplot');
const version = JSON.parse(readFileSync(join(uplot, 'package.json'), 'utf8')).version;

mkdirSync(join(target, 'vendor'), { recursive: true });
copyFileSync(join(pkg, 'src', 'index.js'), join(target, 'fedloom-client.js'));
copyFileSync(join(uplot, 'dist', 'uPlot.esm.js'), join(target, 'vendor', 'uPlot.esm.js'));
copyFileSync(join(uplot, 'dist', 'uPlot.min.css'), join(target, 'vendor', 'uPlot.min.css'));
copyFileSync(join(uplot, 'LICENSE'), join(target, 'vendor', 'uPlot.LICENSE.txt'));
console.log(`vendored the client and uPlot ${version} into ${target}`);
