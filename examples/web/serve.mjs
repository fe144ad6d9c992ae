#!/usr/bin/env node
// A tiny static server for the web example, on 127.0.0.1 only.
//
//   node examples/web/serve.mjs EXPORT_DIR [--port 8000]
//
// Serves the page (examples/web), the shared modules (examples/common as /common/), the
// dist files of the npm packages the page imports (/node_modules/<package>/dist/...) and the
// export directory (/model/). Every response carries Cross-Origin-Opener-Policy: same-origin
// and Cross-Origin-Embedder-Policy: require-corp, so the page is crossOriginIsolated and
// onnxruntime-web can use WASM threads. --port 0 picks a free port; the first line on stdout
// is "serving http://127.0.0.1:PORT/".

import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const here = path.dirname(fileURLToPath(import.meta.url));
const MIME = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".wasm": "application/wasm",
  ".png": "image/png",
  ".svg": "image/svg+xml",
  ".ico": "image/x-icon",
  ".txt": "text/plain; charset=utf-8",
  ".jinja": "text/plain; charset=utf-8",
};
// Only the packages the page imports, and only their dist folders.
const PACKAGES = ["onnxruntime-web", "@huggingface/tokenizers", "@huggingface/jinja"];

/** URL path -> file on disk, or null when the path is outside what this server serves. */
export function resolvePath(urlPath, exportDir) {
  let decoded;
  try {
    decoded = decodeURIComponent(urlPath);
  } catch {
    return null;
  }
  if (decoded.includes("\0")) return null;
  const roots = [
    ["/model/", exportDir],
    ["/common/", path.join(here, "..", "common")],
    ...PACKAGES.map((name) => [
      `/node_modules/${name}/dist/`,
      path.join(here, "node_modules", name, "dist"),
    ]),
  ];
  if (decoded === "/") decoded = "/index.html";
  for (const [prefix, root] of roots) {
    if (decoded.startsWith(prefix)) return inside(root, decoded.slice(prefix.length));
  }
  if (decoded === "/index.html" || decoded === "/app.mjs") return inside(here, decoded.slice(1));
  return null;
}

function inside(root, relative) {
  const base = path.resolve(root);
  const file = path.resolve(base, relative);
  return file.startsWith(base + path.sep) ? file : null;
}

export function startServer(exportDir, port = 8000) {
  const server = http.createServer(async (request, response) => {
    const headers = {
      "Cross-Origin-Opener-Policy": "same-origin",
      "Cross-Origin-Embedder-Policy": "require-corp",
      "Cross-Origin-Resource-Policy": "same-origin",
      "Cache-Control": "no-cache",
    };
    const fail = (code, text) => {
      response.writeHead(code, { ...headers, "Content-Type": "text/plain; charset=utf-8" });
      response.end(`${text}\n`);
    };
    if (request.method !== "GET" && request.method !== "HEAD") return fail(405, "GET or HEAD");
    const urlPath = new URL(request.url, "http://127.0.0.1").pathname;
    const file = resolvePath(urlPath, exportDir);
    if (!file) return fail(404, `not found: ${urlPath}`);
    let info;
    try {
      info = await stat(file);
    } catch {
      return fail(404, `not found: ${urlPath}`);
    }
    if (!info.isFile()) return fail(404, `not found: ${urlPath}`);
    const type = MIME[path.extname(file).toLowerCase()] || "application/octet-stream";
    response.writeHead(200, { ...headers, "Content-Type": type, "Content-Length": info.size });
    if (request.method === "HEAD") return response.end();
    createReadStream(file)
      .on("error", () => response.destroy())
      .pipe(response);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve(server));
  });
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { port: { type: "string", default: "8000" } },
  });
  if (positionals.length !== 1) {
    console.error("usage: node serve.mjs EXPORT_DIR [--port 8000]");
    process.exit(2);
  }
  const exportDir = path.resolve(positionals[0]);
  const server = await startServer(exportDir, Number.parseInt(values.port, 10));
  const { port } = server.address();
  console.log(`serving http://127.0.0.1:${port}/ (export ${exportDir} at /model/)`);
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((error) => {
    console.error(`error: ${error.message}`);
    process.exit(1);
  });
}
