// `npm run build`: bundles index.ts (esbuild strips the types; `npm run
// check` type-checks) with every npm package it imports and builds
// {{name}}.wasm (see wharf/build.mjs for how).
import { build } from './wharf/build.mjs';

await build({ entry: 'index.ts', name: '{{name}}' });
