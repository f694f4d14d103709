// Builds dist/index.js (what `tsc` made of index.ts) into {{name}}.wasm, a
// wasi:http component, with ComponentizeJS: `npm run build`. The WIT in wit/
// is the wasi:http 0.2 proxy world that the StarlingMonkey engine inside
// componentize-js 0.23 implements.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';

const { component } = await componentize({
  sourcePath: 'dist/index.js',
  witPath: 'wit',
  worldName: 'service',
});
await writeFile('{{name}}.wasm', component);
console.error(`built {{name}}.wasm (${(component.length / 1048576).toFixed(1)} MiB)`);
