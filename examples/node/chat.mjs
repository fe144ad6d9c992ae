#!/usr/bin/env node
// Chat with a graphattn export on onnxruntime-node.
//
//   node examples/node/chat.mjs EXPORT_DIR "prompt" [--max-new-tokens N] [--threads N]
//       streams the answer to stdout; prefill and decode tokens/s go to stderr
//   node examples/node/chat.mjs EXPORT_DIR --ids '[1,2,3]' --json [--no-eos]
//   node examples/node/chat.mjs EXPORT_DIR --ids '[[1,2,3],[4,5]]' --json
//       greedy token ids as JSON (a list of lists is one left-padded batch);
//       --repeat N: N runs, the fastest decode reported
//   node examples/node/chat.mjs EXPORT_DIR "prompt" --json
//       the chat prompt's ids and the greedy answer's ids as JSON
//
// The KV-cache loop is examples/common/decoder.mjs, shared with the web page.

import { readFile, access } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-node";

import { checkOnnxruntime, Decoder } from "../common/decoder.mjs";
import { StreamDecoder, TextTokenizer } from "../common/text.mjs";

const USAGE =
  "usage: node chat.mjs EXPORT_DIR [PROMPT] [--max-new-tokens N] [--ids JSON] [--json]" +
  " [--no-eos] [--threads N] [--repeat N]";

async function readJson(file, fallback) {
  try {
    await access(file);
  } catch {
    if (fallback !== undefined) return fallback;
    throw new Error(`${file} is missing`);
  }
  return JSON.parse(await readFile(file, "utf8"));
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      "max-new-tokens": { type: "string", default: "64" },
      ids: { type: "string" },
      json: { type: "boolean", default: false },
      "no-eos": { type: "boolean", default: false },
      threads: { type: "string" },
      repeat: { type: "string", default: "1" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help || positionals.length < 1) {
    console.error(USAGE);
    process.exit(values.help ? 0 : 2);
  }
  const [exportDir, prompt] = positionals;
  if (!prompt && !values.ids) throw new Error("give a prompt or --ids");
  const count = (name) => {
    const value = Number(values[name]);
    if (!Number.isInteger(value) || value < 1) {
      throw new Error(`--${name} must be a whole number >= 1, got ${values[name]}`);
    }
    return value;
  };
  const maxNewTokens = count("max-new-tokens");
  if (values.threads !== undefined) count("threads");
  count("repeat");

  const genaiConfig = await readJson(path.join(exportDir, "genai_config.json"), {});
  checkOnnxruntime(ort, genaiConfig);
  const modelFile = genaiConfig?.model?.decoder?.filename || "model.onnx";
  const sessionOptions = { graphOptimizationLevel: "all" };
  if (values.threads) sessionOptions.intraOpNumThreads = Number.parseInt(values.threads, 10);
  const session = await ort.InferenceSession.create(
    path.join(exportDir, modelFile),
    sessionOptions,
  );
  const decoder = new Decoder(ort, session, genaiConfig);
  const useEos = !values["no-eos"];

  if (values.ids) {
    const parsed = JSON.parse(values.ids);
    const batched = Array.isArray(parsed[0]);
    const prompts = batched ? parsed : [parsed];
    // --repeat N: N runs, the fastest decode kept (the first warms up the rest; benchmarks)
    let result = await decoder.generate(prompts, { maxNewTokens, useEos });
    for (let run = 1; run < Number.parseInt(values.repeat, 10); run++) {
      const again = await decoder.generate(prompts, { maxNewTokens, useEos });
      if (again.decodeTokS > result.decodeTokS) result = again;
    }
    const ids = batched ? result.ids : result.ids[0];
    const report = { ids, prefillTokS: result.prefillTokS, decodeTokS: result.decodeTokS };
    if (values.json) console.log(JSON.stringify(report));
    else console.log((batched ? ids : [ids]).map((row) => row.join(" ")).join("\n"));
    return;
  }

  const tokenizer = new TextTokenizer(
    Tokenizer,
    Template,
    await readJson(path.join(exportDir, "tokenizer.json")),
    await readJson(path.join(exportDir, "tokenizer_config.json"), {}),
    await readFile(path.join(exportDir, "chat_template.jinja"), "utf8").catch(() => null),
  );
  const promptIds = tokenizer.chatIds(prompt);
  const stream = new StreamDecoder(tokenizer);
  const stops = new Set(useEos ? decoder.facts.eosIds : []);
  const result = await decoder.generate([promptIds], {
    maxNewTokens,
    useEos,
    onStep: ([token]) => {
      if (values.json || token < 0 || stops.has(token)) return;
      const piece = stream.push(token);
      if (piece) process.stdout.write(piece);
    },
  });
  if (values.json) {
    const report = {
      prompt_ids: promptIds,
      ids: result.ids[0],
      prefillTokS: result.prefillTokS,
      decodeTokS: result.decodeTokS,
    };
    console.log(JSON.stringify(report));
    return;
  }
  process.stdout.write(`${stream.finish()}\n`);
  console.error(
    `prefill: ${result.prefillTokens} tokens, ${result.prefillTokS.toFixed(1)} tok/s;` +
      ` decode: ${result.decodeTokens} tokens, ${result.decodeTokS.toFixed(1)} tok/s`,
  );
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
