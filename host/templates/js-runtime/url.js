// `node:url`, as far as a service can have it: the WHATWG URL classes the
// engine provides.
export const URL = globalThis.URL;
export const URLSearchParams = globalThis.URLSearchParams;

export function fileURLToPath() {
  throw new Error('node:url fileURLToPath: a Wharf service has no file system');
}

export default { URL, URLSearchParams, fileURLToPath };
