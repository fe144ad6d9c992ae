// The KV-cache decode loop for a graphattn export, shared by examples/node and examples/web.
//
// It is written against the InferenceSession/Tensor API that onnxruntime-node and
// onnxruntime-web share, so the caller passes its `ort` module and a session it created:
//
//   const decoder = new Decoder(ort, session, genaiConfig);
//   const result = await decoder.generate([[1, 2, 3]], { maxNewTokens: 32 });
//   // result.ids: new token ids per row; result.prefillTokS / result.decodeTokS
//
// Graph I/O (see README "Graph I/O"): input_ids [batch_size, sequence_length] and
// attention_mask [batch_size, total_sequence_length] int64, position_ids only where the graph
// has that input, past_key_values.{i}.key|value [batch_size, kv_heads, past_sequence_length,
// head_dim]; outputs logits [batch_size, 1 or sequence_length, vocab] and
// present.{i}.key|value. A first step feeds empty pasts (past length 0); each later step
// feeds the presents back as pasts.

const now = () => (globalThis.performance ? globalThis.performance.now() : Date.now());

/** float16 bits -> number (for fp16 logits, which onnxruntime returns as Uint16Array). */
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** Index of the largest of `count` values starting at `offset` (first one on ties, like NumPy). */
export function argmax(data, offset, count) {
  const half = data instanceof Uint16Array;
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < count; i++) {
    const value = half ? halfToFloat(data[offset + i]) : data[offset + i];
    if (value > bestValue) {
      bestValue = value;
      best = i;
    }
  }
  return best;
}

/**
 * Throws, before the graph is loaded, when the export needs a newer onnxruntime than `ort` is
 * (genai_config.json's top-level "graphattn.min_onnxruntime", e.g. "1.32" for a graph lowered
 * with --ort-version 1.32): one clear message instead of onnxruntime's schema error.
 */
export function checkOnnxruntime(ort, genaiConfig = {}) {
  const needed = genaiConfig?.["graphattn.min_onnxruntime"];
  const installed = ort?.env?.versions?.common;
  if (!needed || !installed) return;
  const parts = (text) => text.split(".").map((p) => Number.parseInt(p, 10) || 0);
  const [a, b] = [parts(installed), parts(needed)];
  const older = a[0] < b[0] || (a[0] === b[0] && (a[1] ?? 0) < (b[1] ?? 0));
  if (older) {
    throw new Error(
      `the export needs onnxruntime >= ${needed}, but this is ${installed}` +
        ` (re-export with --ort-version ${a[0]}.${a[1]})`,
    );
  }
}

/** Stop ids from genai_config's eos_token_id (a number or a list). */
export function eosIds(genaiConfig) {
  const eos = genaiConfig?.model?.eos_token_id;
  if (eos === undefined || eos === null) return [];
  return (Array.isArray(eos) ? eos : [eos]).map(Number);
}

/** Left-pads rows of ids: {ids, mask} as row-major number arrays [batch * width]. */
export function leftPad(rows, padId) {
  const width = Math.max(...rows.map((r) => r.length));
  const ids = new Array(rows.length * width).fill(padId);
  const mask = new Array(rows.length * width).fill(0);
  rows.forEach((row, b) => {
    row.forEach((token, j) => {
      ids[b * width + width - row.length + j] = token;
      mask[b * width + width - row.length + j] = 1;
    });
  });
  return { ids, mask, width };
}

/** What the decoder needs to know about a graph, from the session's I/O and genai_config. */
export function modelFacts(session, genaiConfig = {}) {
  const inputs = session.inputNames;
  const meta = new Map((session.inputMetadata || []).map((m) => [m.name, m]));
  const decoderConfig = genaiConfig?.model?.decoder || {};
  const names = decoderConfig.inputs || {};
  const outs = decoderConfig.outputs || {};
  const keyPattern = names.past_key_names || "past_key_values.%d.key";
  const valuePattern = names.past_value_names || "past_key_values.%d.value";
  const presentKey = outs.present_key_names || "present.%d.key";
  const presentValue = outs.present_value_names || "present.%d.value";
  let layers = 0;
  while (inputs.includes(keyPattern.replace("%d", layers))) layers++;
  if (!layers) throw new Error(`the graph has no ${keyPattern.replace("%d", 0)} input`);
  if (decoderConfig.num_hidden_layers && decoderConfig.num_hidden_layers !== layers) {
    throw new Error(
      `genai_config says ${decoderConfig.num_hidden_layers} layers, the graph has ${layers}`,
    );
  }
  const first = meta.get(keyPattern.replace("%d", 0));
  const shape = first && first.isTensor ? first.shape : [];
  const fixed = (dim, fallback) => (typeof dim === "number" && dim > 0 ? dim : fallback);
  const kvHeads = fixed(shape[1], decoderConfig.num_key_value_heads);
  const headDim = fixed(shape[3], decoderConfig.head_size);
  if (!kvHeads || !headDim) throw new Error("cannot tell kv_heads/head_dim from graph or config");
  const kvType = first && first.isTensor && first.type ? first.type : "float32";
  const layer = (pattern, i) => pattern.replace("%d", i);
  return {
    layers,
    kvHeads,
    headDim,
    kvType,
    inputIds: names.input_ids || "input_ids",
    attentionMask: names.attention_mask || "attention_mask",
    positionIds: inputs.includes(names.position_ids || "position_ids")
      ? names.position_ids || "position_ids"
      : null,
    logits: outs.logits || "logits",
    pastKeys: Array.from({ length: layers }, (_, i) => layer(keyPattern, i)),
    pastValues: Array.from({ length: layers }, (_, i) => layer(valuePattern, i)),
    presentKeys: Array.from({ length: layers }, (_, i) => layer(presentKey, i)),
    presentValues: Array.from({ length: layers }, (_, i) => layer(presentValue, i)),
    vocabSize: genaiConfig?.model?.vocab_size ?? null,
    padId: genaiConfig?.model?.pad_token_id ?? genaiConfig?.model?.eos_token_id ?? 0,
    eosIds: eosIds(genaiConfig),
    contextLength: genaiConfig?.model?.context_length ?? null,
  };
}

export class Decoder {
  /**
   * @param ort the onnxruntime-node or onnxruntime-web module (its Tensor class is used)
   * @param session an InferenceSession over the export's model.onnx
   * @param genaiConfig the parsed genai_config.json (may be {}: then names are the defaults)
   */
  constructor(ort, session, genaiConfig = {}) {
    this.ort = ort;
    this.session = session;
    this.facts = modelFacts(session, genaiConfig);
  }

  int64(values, dims) {
    return new this.ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
  }

  emptyPast(batch) {
    const { kvType, kvHeads, headDim } = this.facts;
    const data = kvType === "float16" ? new Uint16Array(0) : new Float32Array(0);
    return new this.ort.Tensor(kvType, data, [batch, kvHeads, 0, headDim]);
  }

  /** position_ids of the last `count` columns: each token's index among its row's real ones. */
  static positions(mask, batch, width, count) {
    const out = [];
    for (let b = 0; b < batch; b++) {
      let seen = 0;
      const row = [];
      for (let j = 0; j < width; j++) {
        const real = mask[b * width + j];
        row.push(real ? seen : 0);
        seen += real;
      }
      out.push(...row.slice(width - count));
    }
    return out;
  }

  /**
   * Greedy decode of a batch of prompts (left-padded). Yields nothing; calls
   * `onStep(tokens)` after each step with the chosen id of every row (-1: row stopped).
   *
   * @param prompts number[][] prompt token ids, one array per row
   * @param options.maxNewTokens tokens to generate per row (>= 1)
   * @param options.stopIds ids that end a row (default: genai_config's eos_token_id)
   * @param options.useEos false: only options.stopIds stop a row
   * @returns {ids: number[][], prefillTokS, decodeTokS, prefillSeconds, decodeSeconds, ...}
   */
  async generate(prompts, { maxNewTokens = 32, stopIds, useEos = true, onStep } = {}) {
    const f = this.facts;
    if (!prompts.length || prompts.some((p) => !p.length)) throw new Error("a prompt is empty");
    if (maxNewTokens < 1) throw new Error(`maxNewTokens must be >= 1, got ${maxNewTokens}`);
    for (const id of prompts.flat()) {
      if (!Number.isInteger(id) || id < 0 || (f.vocabSize && id >= f.vocabSize)) {
        throw new Error(`token id ${id} is outside the vocabulary [0, ${f.vocabSize})`);
      }
    }
    const longest = Math.max(...prompts.map((p) => p.length));
    if (f.contextLength && longest + maxNewTokens > f.contextLength) {
      throw new Error(
        `prompt of ${longest} tokens + ${maxNewTokens} new exceeds the context of ${f.contextLength}`,
      );
    }
    const stops = new Set([...(useEos ? f.eosIds : []), ...(stopIds || [])]);
    const batch = prompts.length;
    let { ids, mask, width } = leftPad(prompts, f.padId);
    const pasts = {};
    for (let i = 0; i < f.layers; i++) {
      pasts[f.pastKeys[i]] = this.emptyPast(batch);
      pasts[f.pastValues[i]] = this.emptyPast(batch);
    }
    const results = prompts.map(() => []);
    const alive = new Array(batch).fill(true);
    const timing = { prefillSeconds: 0, prefillTokens: 0, decodeSeconds: 0, decodeTokens: 0 };
    let seqLen = width;
    for (let step = 0; step < maxNewTokens; step++) {
      const feeds = {
        [f.inputIds]: this.int64(ids, [batch, seqLen]),
        [f.attentionMask]: this.int64(mask, [batch, width]),
        ...pasts,
      };
      if (f.positionIds) {
        feeds[f.positionIds] = this.int64(Decoder.positions(mask, batch, width, seqLen), [
          batch,
          seqLen,
        ]);
      }
      const started = now();
      const outputs = await this.session.run(feeds);
      const seconds = (now() - started) / 1000;
      if (step === 0) {
        timing.prefillSeconds += seconds;
        timing.prefillTokens += mask.reduce((a, b) => a + b, 0);
      } else {
        timing.decodeSeconds += seconds;
        timing.decodeTokens += alive.filter(Boolean).length;
      }
      const logits = outputs[f.logits];
      const [, positionsOut, vocab] = logits.dims;
      const chosen = [];
      for (let b = 0; b < batch; b++) {
        const offset = (b * positionsOut + positionsOut - 1) * vocab;
        chosen.push(alive[b] ? argmax(logits.data, offset, vocab) : -1);
      }
      for (let i = 0; i < f.layers; i++) {
        for (const [past, present] of [
          [f.pastKeys[i], f.presentKeys[i]],
          [f.pastValues[i], f.presentValues[i]],
        ]) {
          pasts[past].dispose?.();
          pasts[past] = outputs[present];
        }
      }
      logits.dispose?.();
      chosen.forEach((token, b) => {
        if (token >= 0) {
          results[b].push(token);
          if (stops.has(token)) alive[b] = false;
        }
      });
      if (onStep) await onStep(chosen, step);
      if (!alive.some(Boolean)) break;
      ids = chosen.map((token, b) => (alive[b] ? token : f.padId));
      seqLen = 1;
      width += 1;
      const grown = [];
      for (let b = 0; b < batch; b++) {
        grown.push(...mask.slice(b * (width - 1), b * (width - 1) + width - 1), 1);
      }
      mask = grown;
    }
    for (const tensor of Object.values(pasts)) tensor.dispose?.();
    const rate = (tokens, seconds) => (seconds > 0 ? tokens / seconds : 0);
    return {
      ids: results,
      ...timing,
      prefillTokS: rate(timing.prefillTokens, timing.prefillSeconds),
      decodeTokS: rate(timing.decodeTokens, timing.decodeSeconds),
    };
  }
}
