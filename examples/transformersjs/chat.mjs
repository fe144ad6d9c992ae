// A chat answer through transformers.js's text-generation pipeline itself, from local files.
//
//   node chat.mjs MODEL_DIR "user message" N [dtype]
//
// Calls pipeline('text-generation', MODEL_DIR)([{role: 'user', content}], {max_new_tokens: N,
// do_sample: false}) as an app would (chat template, greedy, stop at EOS) and prints the
// assistant's reply as one JSON string on stdout.
import path from 'node:path';
import { env, pipeline } from '@huggingface/transformers';

const [dir, message, count, dtype] = process.argv.slice(2);
if (!dir || message === undefined || !count) {
    console.error('usage: node chat.mjs MODEL_DIR "user message" N [dtype]');
    process.exit(2);
}
env.allowRemoteModels = false;
env.useFSCache = false;

const generator = await pipeline('text-generation', path.resolve(dir), {
    local_files_only: true,
    device: 'cpu',
    ...(dtype ? { dtype } : {}),
});
const [output] = await generator([{ role: 'user', content: message }], {
    max_new_tokens: Number.parseInt(count, 10),
    do_sample: false,
});
const reply = output.generated_text.at(-1);
console.log(JSON.stringify(reply.content));
