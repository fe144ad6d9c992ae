// Greedy decoding of a graphattn export (`graphattn export SRC -o DIR --layout transformers.js`)
// with transformers.js in Node, from local files only.
//
//   node generate.mjs MODEL_DIR PROMPT_IDS_JSON N [dtype]
//
// Loads MODEL_DIR with pipeline('text-generation', ...) — config.json, generation_config.json,
// tokenizer.json, tokenizer_config.json and onnx/model{suffix}.onnx(+_data) — then generates N
// tokens greedily (do_sample false, no stop at EOS) after the prompt ids and prints the generated ids (the prompt
// left out) as one JSON array on stdout. Timings go to stderr. dtype (fp32, fp16, q4, q8) picks
// the ONNX file; without it, config.json's transformers.js_config.dtype decides.
import path from 'node:path';
import { env, pipeline, Tensor } from '@huggingface/transformers';

const [dir, promptJson, count, dtype] = process.argv.slice(2);
if (!dir || !promptJson || !count) {
    console.error('usage: node generate.mjs MODEL_DIR PROMPT_IDS_JSON N [dtype]');
    process.exit(2);
}

env.allowRemoteModels = false; // never reach for the Hub
env.allowLocalModels = true;
env.useFSCache = false; // read the export itself, never a cached copy
// An absolute path is read as it is; a relative one would be joined to env.localModelPath.
const modelDir = path.resolve(dir);

const promptIds = JSON.parse(promptJson);
const maxNewTokens = Number.parseInt(count, 10);

const loadStart = performance.now();
const generator = await pipeline('text-generation', modelDir, {
    local_files_only: true,
    device: 'cpu',
    ...(dtype ? { dtype } : {}),
});
const loadSeconds = (performance.now() - loadStart) / 1000;

const inputIds = new Tensor('int64', BigInt64Array.from(promptIds.map(BigInt)), [1, promptIds.length]);
const start = performance.now();
const output = await generator.model.generate({
    inputs: inputIds,
    attention_mask: new Tensor('int64', new BigInt64Array(promptIds.length).fill(1n), [1, promptIds.length]),
    max_new_tokens: maxNewTokens,
    eos_token_id: null, // exactly N tokens, as graphattn's generate(..., use_eos=False)
    do_sample: false,
});
const seconds = (performance.now() - start) / 1000;

const ids = output.tolist()[0].map(Number).slice(promptIds.length);
console.log(JSON.stringify(ids));
console.error(
    `transformers.js: load ${loadSeconds.toFixed(2)} s, ${ids.length} tokens in ${seconds.toFixed(2)} s` +
        ` (${(ids.length / seconds).toFixed(1)} tok/s incl. prefill of ${promptIds.length}):` +
        ` ${JSON.stringify(generator.tokenizer.decode(ids))}`,
);
