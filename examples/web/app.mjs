// The page's script: loads an export served at /model/ (serve.mjs) into onnxruntime-web's
// WASM backend and runs the KV-cache loop of examples/common/decoder.mjs.
//
// URL query (all optional):
//   prompt=TEXT        chat prompt to run at load
//   ids=[1,2,3]        prompt token ids to run at load (or [[...],[...]]: a left-padded batch)
//   max=N              new tokens per row (default 64)
//   noeos=1            do not stop at genai_config's eos_token_id
//   threads=N          WASM threads (default: all cores when crossOriginIsolated, else 1)
//   repeat=N           with ids=: N runs, the fastest decode kept (benchmarks)
//   model=/model/      where the export is served
// When a run ends, window.result = {ids, promptIds, text, prefillTokS, decodeTokS, threads,
// crossOriginIsolated, ...}; on failure window.result = {error}.

import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-web";

import { checkOnnxruntime, Decoder } from "/common/decoder.mjs";
import { StreamDecoder, TextTokenizer } from "/common/text.mjs";

const query = new URLSearchParams(location.search);
const modelBase = new URL(query.get("model") || "/model/", location.href);
const $ = (id) => document.getElementById(id);
const setStatus = (text, error = false) => {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
};
const paint = () => new Promise((resolve) => setTimeout(resolve, 0));

/** The text of an optional file of the export, or null where it has none. */
async function fetchText(name) {
  const response = await fetch(new URL(name, modelBase));
  return response.ok ? response.text() : null;
}

async function fetchJson(name, fallback) {
  const response = await fetch(new URL(name, modelBase));
  if (!response.ok) {
    if (fallback !== undefined) return fallback;
    throw new Error(`${name}: HTTP ${response.status}`);
  }
  return response.json();
}

async function load() {
  const threads = Number(query.get("threads")) || (crossOriginIsolated ? navigator.hardwareConcurrency || 1 : 1);
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.wasmPaths = "/node_modules/onnxruntime-web/dist/";
  const genaiConfig = await fetchJson("genai_config.json", {});
  checkOnnxruntime(ort, genaiConfig);
  const modelFile = genaiConfig?.model?.decoder?.filename || "model.onnx";
  setStatus(`loading ${modelFile} (${threads} thread${threads > 1 ? "s" : ""})…`);
  const started = performance.now();
  // the weights: model.onnx.data (our layout) or onnx/model*.onnx_data (transformers.js
  // layout); `path` must equal the tensors' `location`, the file name beside the model
  let externalData = [];
  for (const dataFile of [`${modelFile}.data`, `${modelFile}_data`]) {
    if ((await fetch(new URL(dataFile, modelBase), { method: "HEAD" })).ok) {
      const path = dataFile.split("/").pop();
      externalData = [{ path, data: new URL(dataFile, modelBase).href }];
      break;
    }
  }
  const session = await ort.InferenceSession.create(new URL(modelFile, modelBase).href, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
    externalData,
  });
  const loadSeconds = (performance.now() - started) / 1000;
  const tokenizerJson = await fetchJson("tokenizer.json", null);
  const tokenizer = tokenizerJson
    ? new TextTokenizer(
        Tokenizer,
        Template,
        tokenizerJson,
        await fetchJson("tokenizer_config.json", {}),
        await fetchText("chat_template.jinja"),
      )
    : null;
  return { decoder: new Decoder(ort, session, genaiConfig), tokenizer, threads, loadSeconds };
}

async function run(app, { promptIds, batched = false, maxNewTokens, useEos, repeat = 1 }) {
  const { decoder, tokenizer } = app;
  const prompts = batched ? promptIds : [promptIds];
  const output = $("output");
  output.textContent = "";
  $("stats").textContent = "";
  const stream = tokenizer && !batched ? new StreamDecoder(tokenizer) : null;
  const stops = new Set(useEos ? decoder.facts.eosIds : []);
  let count = 0;
  let result = await decoder.generate(prompts, {
    maxNewTokens,
    useEos,
    onStep: async (tokens) => {
      count += 1;
      const [token] = tokens;
      if (stream && token >= 0 && !stops.has(token)) output.textContent += stream.push(token);
      else if (!stream) output.textContent = `${count} steps: ${tokens.join(" ")}`;
      setStatus(`generating… ${count} tokens`);
      await paint();
    },
  });
  if (stream) output.textContent += stream.finish();
  // repeat=N: N runs in all (this one warmed up the rest), the fastest decode kept
  for (let index = 1; index < repeat; index++) {
    setStatus(`timing run ${index + 1} of ${repeat}…`);
    await paint();
    const timed = await decoder.generate(prompts, { maxNewTokens, useEos });
    if (timed.decodeTokS > result.decodeTokS) result = { ...timed, ids: result.ids };
  }
  const text = stream ? output.textContent : null;
  $("stats").textContent =
    `prefill ${result.prefillTokens} tokens, ${result.prefillTokS.toFixed(1)} tok/s · ` +
    `decode ${result.decodeTokens} tokens, ${result.decodeTokS.toFixed(1)} tok/s · ` +
    `${app.threads} WASM thread${app.threads > 1 ? "s" : ""}` +
    (crossOriginIsolated ? " (crossOriginIsolated)" : "");
  setStatus(`done (model loaded in ${app.loadSeconds.toFixed(1)} s)`);
  return {
    ids: batched ? result.ids : result.ids[0],
    promptIds,
    text,
    prefillTokS: result.prefillTokS,
    decodeTokS: result.decodeTokS,
    prefillTokens: result.prefillTokens,
    decodeTokens: result.decodeTokens,
    threads: app.threads,
    crossOriginIsolated,
    loadSeconds: app.loadSeconds,
  };
}

async function main() {
  let app;
  try {
    app = await load();
  } catch (error) {
    setStatus(`failed to load: ${error.message ?? error}`, true);
    window.result = { error: String(error.message ?? error) };
    return;
  }
  setStatus(`ready (model loaded in ${app.loadSeconds.toFixed(1)} s, ${app.threads} thread(s))`);
  $("go").disabled = !app.tokenizer;
  const maxFromQuery = Number(query.get("max")) || 64;
  $("max").value = maxFromQuery;
  const useEos = query.get("noeos") !== "1";
  const guarded = async (options) => {
    $("go").disabled = true;
    try {
      window.result = await run(app, options);
    } catch (error) {
      setStatus(`error: ${error.message ?? error}`, true);
      window.result = { error: String(error.message ?? error) };
    } finally {
      $("go").disabled = !app.tokenizer;
    }
  };
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const promptIds = app.tokenizer.chatIds($("prompt").value);
    guarded({ promptIds, maxNewTokens: Number($("max").value) || 64, useEos });
  });
  if (query.has("ids")) {
    const parsed = JSON.parse(query.get("ids"));
    const batched = Array.isArray(parsed[0]);
    const repeat = Number(query.get("repeat")) || 1;
    await guarded({ promptIds: parsed, batched, maxNewTokens: maxFromQuery, useEos, repeat });
  } else if (query.has("prompt")) {
    $("prompt").value = query.get("prompt");
    if (!app.tokenizer) {
      window.result = { error: "this export has no tokenizer.json: pass ids=" };
      return;
    }
    await guarded({ promptIds: app.tokenizer.chatIds(query.get("prompt")), maxNewTokens: maxFromQuery, useEos });
  }
}

main();
