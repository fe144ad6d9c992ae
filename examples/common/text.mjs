// Text side of the examples, shared by examples/node and examples/web: the export's
// tokenizer.json through @huggingface/tokenizers, its chat template through
// @huggingface/jinja, and a streaming detokenizer. The caller passes both packages' classes
// (Node resolves bare imports from examples/node/node_modules, the page through its import
// map), so this file imports nothing.

export class TextTokenizer {
  /**
   * @param Tokenizer the Tokenizer class of @huggingface/tokenizers
   * @param Template the Template class of @huggingface/jinja
   * @param tokenizerJson parsed tokenizer.json
   * @param tokenizerConfig parsed tokenizer_config.json ({} when the export has none)
   * @param chatTemplate the text of chat_template.jinja, which wins over the config's
   *   chat_template as in graphattn.runtime (null when the export has none)
   */
  constructor(Tokenizer, Template, tokenizerJson, tokenizerConfig = {}, chatTemplate = null) {
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    this.config = tokenizerConfig;
    const template = chatTemplate ?? tokenizerConfig.chat_template;
    this.template = typeof template === "string" ? new Template(template) : null;
  }

  static tokenText(value) {
    return value && typeof value === "object" ? value.content : (value ?? "");
  }

  encode(text, { addSpecialTokens = true } = {}) {
    return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(ids) {
    return this.tokenizer.decode(ids, { skip_special_tokens: true });
  }

  /** The prompt ids of one user message: the chat template when there is one, else the text. */
  chatIds(prompt) {
    if (!this.template) return this.encode(prompt);
    const text = this.template.render({
      messages: [{ role: "user", content: prompt }],
      add_generation_prompt: true,
      bos_token: TextTokenizer.tokenText(this.config.bos_token),
      eos_token: TextTokenizer.tokenText(this.config.eos_token),
    });
    return this.encode(text, { addSpecialTokens: false });
  }
}

/** Turns a growing list of ids into text pieces; holds back a partial UTF-8 character. */
export class StreamDecoder {
  constructor(tokenizer) {
    this.tokenizer = tokenizer;
    this.ids = [];
    this.emitted = "";
  }

  push(token) {
    this.ids.push(token);
    const text = this.tokenizer.decode(this.ids);
    if (text.endsWith("\ufffd") || !text.startsWith(this.emitted)) return "";
    const piece = text.slice(this.emitted.length);
    this.emitted = text;
    return piece;
  }

  finish() {
    const text = this.tokenizer.decode(this.ids);
    const piece = text.startsWith(this.emitted) ? text.slice(this.emitted.length) : "";
    this.emitted = text;
    return piece;
  }
}
