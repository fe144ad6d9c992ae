// The token ids transformers.js's tokenizer gives a one-message chat prompt, from local files.
//
//   node chat_ids.mjs MODEL_DIR "user message"
//
// Applies tokenizer_config.json's chat template (add_generation_prompt) with the tokenizer that
// pipeline('text-generation', MODEL_DIR) would load, and prints the ids as one JSON array.
import path from 'node:path';
import { AutoTokenizer, env } from '@huggingface/transformers';

const [dir, message] = process.argv.slice(2);
if (!dir || message === undefined) {
    console.error('usage: node chat_ids.mjs MODEL_DIR "user message"');
    process.exit(2);
}
env.allowRemoteModels = false;
env.useFSCache = false;

const tokenizer = await AutoTokenizer.from_pretrained(path.resolve(dir), { local_files_only: true });
const ids = tokenizer.apply_chat_template([{ role: 'user', content: message }], {
    add_generation_prompt: true,
    tokenize: true,
    return_tensor: false,
    return_dict: false,
});
console.log(JSON.stringify(ids.map(Number)));
