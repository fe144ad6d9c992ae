"""A tiny BERT-style WordPiece tokenizer built in the test process (no download):
``tokenizer.json`` with lower-casing, BERT pre-tokenization and ``[CLS] … [SEP]``."""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a graph graphs attend attends attention to every token of its row and "
    "hello world encoder bert model embed sentence vector , . ! ##s ##ing ##ed ##er"
).split()
VOCAB = {token: index for index, token in enumerate([*SPECIAL, *WORDS])}


def write_tokenizer(directory: Path) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json + vocab.txt in ``directory``."""
    tokenizer = Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in VOCAB))
    config = {"do_lower_case": True, "model_max_length": 16, "tokenizer_class": "BertTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer
