// Types of ./index.js: what Wharf offers a service without WIT.

/** The service's environment: its manifest's `[env]`. */
export declare const env: Readonly<Record<string, string | undefined>>;

/** A failure with what to do about it (a missing grant, a bad name). */
export declare class WharfError extends Error {}

/** A key-value bucket: keys are strings, values strings, bytes or JSON. */
export interface Bucket {
  readonly name: string;
  /** The value of `key` as text, or null. */
  get(key: string): string | null;
  /** The value of `key` as bytes, or null. */
  getBytes(key: string): Uint8Array | null;
  /** The value of `key` parsed as JSON, or null. */
  getJSON<T = unknown>(key: string): T | null;
  /** Sets `key` to a string, bytes, or anything else as JSON. */
  set(key: string, value: unknown): void;
  /** Deletes `key`. */
  delete(key: string): void;
  /** Whether `key` has a value. */
  has(key: string): boolean;
  /** Adds `by` (default 1) to the counter at `key`, atomically; the new value. */
  increment(key: string, by?: number): number;
  /** Every key. */
  keys(): string[];
}

/** Key-value buckets (`wasi:keyvalue`), within the manifest's `[keyvalue] buckets`. */
export declare const kv: { open(name: string): Bucket };

/** Configuration and secrets (`wasi:config`): the manifest's `[config]` and `[secrets]`. */
export declare const config: {
  get(key: string): string | undefined;
  all(): Record<string, string>;
};

/** Publishes to `topic` (within `[messaging] publish`); resolves once the broker has it. */
export declare function publish(
  topic: string,
  body: unknown,
  options?: { contentType?: string },
): Promise<{ id: string; topic: string }>;

/** Sends a request to `topic` and resolves with the first reply's text. */
export declare function request(
  topic: string,
  body: unknown,
  options?: { within?: string; contentType?: string },
): Promise<string>;

/** A JSON response with `status` (200 by default). */
export declare function json(value: unknown, status?: number): Response;

/** What a handler may return: a Response, text, JSON-able data, or nothing (204). */
export type Answer = Response | string | object | null | undefined;

/** Serves HTTP with `handler`; a thrown error is logged and answered 500. */
export declare function serve(handler: (request: Request) => Answer | Promise<Answer>): void;
