// `node:process` and `process`, for packages that import them: the same
// object as the injected global.
import { process } from './globals.js';

export const env = process.env;
export const nextTick = process.nextTick;
export default process;
