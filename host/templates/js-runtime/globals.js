// Globals that Node packages expect and the bundler injects where they are
// used: `process` (its `env` is the service's `[env]`) and `Buffer`.
import { Buffer } from 'node:buffer';
import { env } from './index.js';

export { Buffer };

export const process = {
  env,
  argv: [],
  browser: true,
  platform: 'wasi',
  version: 'v20.0.0',
  versions: {},
  cwd: () => '/',
  nextTick: (callback, ...args) => queueMicrotask(() => callback(...args)),
};
