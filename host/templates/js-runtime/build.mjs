// Builds a Wharf service in JavaScript or TypeScript into one WebAssembly
// component, the way `npm run build` does:
//
// 1. esbuild bundles the entry file and every npm package it imports into
//    one ES module (ComponentizeJS reads exactly one), for the browser
//    platform — what the StarlingMonkey engine is closest to — with
//    `process.env` (the manifest's [env]), `Buffer`, `events` and `url`
//    provided, and any other Node.js built-in refused at build time with a
//    message naming it and who imported it.
// 2. ComponentizeJS turns the bundle into a component of the world in wit/.
// 3. The bundle's source map is embedded in the component (custom section
//    `wharf:source-map`), so Wharf logs stack traces against your files.
import { build as bundle } from 'esbuild';
import { componentize } from '@bytecodealliance/componentize-js';
import { builtinModules } from 'node:module';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

/** Node built-ins a service can have, and where they come from. */
const provided = {
  buffer: 'buffer/',
  events: 'events/',
  process: join(here, 'process.js'),
  url: join(here, 'url.js'),
};

const escape = (text) => text.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
// `buffer/` (a trailing slash) names the npm package, not the built-in.
const builtins = new RegExp(
  `^(node:)?(${builtinModules.filter((m) => !m.startsWith('_')).map(escape).join('|')})(/.+)?$`,
);

/** Resolves the Node built-ins a service can have, refuses the others. */
const nodeBuiltins = {
  name: 'wharf-node-builtins',
  setup(build) {
    build.onResolve({ filter: builtins }, async (args) => {
      const name = args.path.replace(/^node:/, '');
      const target = provided[name];
      if (target) {
        const found = await build.resolve(target, {
          kind: args.kind,
          resolveDir: here,
          pluginData: { provided: true },
        });
        // Nothing of a polyfill runs unless it is used (tree-shaken).
        return found.errors.length
          ? { errors: found.errors }
          : { path: found.path, sideEffects: false };
      }
      const by = args.importer ? relative(process.cwd(), args.importer) : 'the entry';
      return {
        errors: [
          {
            text: `"${args.path}" is a Node.js built-in module (imported by ${by}); a WebAssembly service has none of them but ${Object.keys(provided).join(', ')}. Use a package that works in the browser, fetch() for HTTP, or ./wharf for state and messages.`,
          },
        ],
      };
    });
  },
};

/** `value` as an unsigned LEB128. */
function leb128(value) {
  const out = [];
  do {
    let byte = value & 0x7f;
    value >>>= 7;
    if (value !== 0) byte |= 0x80;
    out.push(byte);
  } while (value !== 0);
  return Uint8Array.from(out);
}

/** A WebAssembly custom section named `name` holding `data`. */
function customSection(name, data) {
  const nameBytes = new TextEncoder().encode(name);
  const payload = Buffer.concat([leb128(nameBytes.length), nameBytes, data]);
  return Buffer.concat([Uint8Array.of(0), leb128(payload.length), payload]);
}

/**
 * Builds `entry` into `NAME.wasm` in the project directory (the current
 * one); on failure prints what went wrong (not a stack of the build
 * tools) and exits with status 1.
 */
export async function build(options) {
  try {
    await buildComponent(options);
  } catch (err) {
    // esbuild has printed its errors with their places already.
    if (!err?.errors) console.error(`build failed: ${err?.message ?? err}`);
    process.exitCode = 1;
  }
}

async function buildComponent({ entry, name }) {
  const project = process.cwd();
  const outDir = join(project, 'dist');
  await mkdir(outDir, { recursive: true });
  // The bundle's entry: the service's own file, and the HTTP export its
  // serve() call is wired to.
  const wiring = [
    `export { incomingHandler } from ${JSON.stringify(join(here, 'index.js'))};`,
    `import ${JSON.stringify(resolve(project, entry))};`,
  ].join('\n');
  const bundled = await bundle({
    stdin: { contents: wiring, resolveDir: project, sourcefile: 'wharf-entry.js' },
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2022',
    conditions: ['worker', 'browser'],
    outfile: join(outDir, 'service.js'),
    sourcemap: 'external',
    sourcesContent: false,
    write: false,
    external: ['wasi:*'],
    inject: [join(here, 'globals.js')],
    define: { 'process.env.NODE_ENV': '"production"' },
    plugins: [nodeBuiltins],
    logLevel: 'warning',
  });
  const js = bundled.outputFiles.find((file) => file.path.endsWith('.js'));
  const map = JSON.parse(bundled.outputFiles.find((file) => file.path.endsWith('.map')).text);
  // Sources relative to the project, as you would name them.
  map.sources = map.sources.map((source) => relative(project, resolve(outDir, source)));
  await writeFile(js.path, js.contents);
  const { component } = await componentize({
    sourcePath: js.path,
    witPath: join(project, 'wit'),
    worldName: 'service',
  });
  const mapBytes = new TextEncoder().encode(JSON.stringify(map));
  const wasm = Buffer.concat([component, customSection('wharf:source-map', mapBytes)]);
  await writeFile(join(project, `${name}.wasm`), wasm);
  console.error(`built ${name}.wasm (${(wasm.length / 1048576).toFixed(1)} MiB)`);
}
