// Builds JavaScript services into wasi:http components with ComponentizeJS.
//
//   node build.mjs SERVICE_DIR OUT.wasm
//
// SERVICE_DIR/index.js handles requests with the fetch-event API
// (addEventListener('fetch', e => e.respondWith(...))). The WIT is
// wit/wasi-0.2.10 at the workspace root: the wasi:http version the
// StarlingMonkey engine inside componentize-js 0.23 implements. The world is
// `service` (the wasi:http proxy world), or the one named in SERVICE_DIR/world
// (`stateful-service` adds wasi:keyvalue and wasi:config).
import { componentize } from '@bytecodealliance/componentize-js';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const [serviceDir, out] = process.argv.slice(2);
if (!serviceDir || !out) {
  console.error('usage: node build.mjs SERVICE_DIR OUT.wasm');
  process.exit(2);
}
const worldName = await readFile(resolve(serviceDir, 'world'), 'utf8')
  .then((text) => text.trim())
  .catch(() => 'service');
const { component } = await componentize({
  sourcePath: resolve(serviceDir, 'index.js'),
  witPath: join(here, '..', '..', 'wit', 'wasi-0.2.10'),
  worldName,
});
await mkdir(dirname(resolve(out)), { recursive: true });
await writeFile(out, component);
console.error(`built ${out} (${(component.length / 1048576).toFixed(1)} MiB)`);
