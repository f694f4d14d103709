// `npm run build`: bundles index.js with every npm package it imports and
// builds {{name}}.wasm (see wharf/build.mjs for how).
import { build } from './wharf/build.mjs';

await build({ entry: 'index.js', name: '{{name}}' });
