"""`moeyard prepare --chat`: conversations -> tokens rendered by the model's own chat template, and a loss mask.

Each JSONL row holds a list of messages ({"role": ..., "content": ...}) at `--messages-field` (default
`messages`). A row is rendered with the chat template of the tokenizer's folder (tokenizer_config.json's
`chat_template`, or chat_template.jinja beside it), in a sandboxed Jinja environment set up as transformers'
`apply_chat_template` sets it up, then tokenized with tokenizer.json without added special tokens (the template
writes them). So the token ids are the ones the model sees at inference.

The loss mask marks the tokens each assistant turn contributes. They are found by rendering prefixes: the
text of an assistant turn i is what `render(messages[:i + 1])` adds to `render(messages[:i],
add_generation_prompt=True)` - the assistant's content and whatever the template closes the turn with (its
end-of-turn token, and the newline Qwen-style templates write after it), but not the turn's header, which the
generation prompt holds. This is exact for a template whose rendering of earlier messages does not change when
later ones follow ("prefix-stable", as Qwen's and Llama's templates are); a row where that does not hold is
refused, naming the row, rather than masked wrongly. A token is trained when its first character lies in such a
span. Rows are separated by the end-of-text token, which must never occur inside a row, so that
data.document_mask keeps rows apart.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moeyard.interop.prepare import _visible_files, load_tokenizer
from moeyard.train.data import LOSS_MASK_FILE

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
"""tokenizer_config.json entries handed to the template, as transformers hands them (`special_tokens_map`)."""
LOSS_ON = ("assistant", "last", "all")
LONG_ROWS = ("refuse", "cut")
ROWS_PER_BATCH = 256
"""Rows rendered, then tokenized in one `encode_batch` call (the tokenizer spreads a batch over threads)."""


@dataclass(frozen=True, kw_only=True)
class ChatOptions:
    """How `prepare --chat` reads rows and what it trains on."""

    messages_field: str = "messages"
    """The JSONL field holding the list of messages."""
    loss_on: str = "assistant"
    """assistant: every assistant turn; last: only the final assistant turn; all: every token of the row."""
    seq_len: int | None = None
    """Rows longer than this many tokens are cut or refused (`long_rows`); None: no limit."""
    long_rows: str = "refuse"
    """refuse: stop with the row named; cut: keep the first `seq_len` tokens (and their mask)."""
    template: Path | None = None
    """A Jinja chat template file instead of the tokenizer folder's own."""

    def check(self) -> None:
        rules = (
            (self.loss_on in LOSS_ON, "--loss-on", self.loss_on, f"must be one of {', '.join(LOSS_ON)}"),
            (self.long_rows in LONG_ROWS, "--long-rows", self.long_rows, f"must be one of {', '.join(LONG_ROWS)}"),
            (self.seq_len is None or self.seq_len >= 1, "--seq-len", self.seq_len, "must be >= 1"),
        )
        for ok, name, value, rule in rules:
            if not ok:
                raise ValueError(f"{name}={value} {rule}")


def _sandbox() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in: sandboxed (templates from the Hub are
    untrusted code), trim_blocks/lstrip_blocks, loop controls, and its helpers raise_exception, strftime_now and
    a tojson that keeps non-ASCII text and takes indent/separators/sort_keys."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: object) -> object:
    """A special token as the template sees it: older files store an AddedToken dict, templates want its text."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    template: jinja2.Template
    special_tokens: dict
    sha256: str

    @classmethod
    def load(cls, folder: Path, given: Path | None = None) -> ChatTemplate:
        """`given`, else chat_template.jinja in `folder`, else tokenizer_config.json's `chat_template` (a string,
        or transformers' list of named templates, whose `default` is used)."""
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if given is not None:
            source = given.read_text()
        elif (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text()
        else:
            source = config.get("chat_template")
            if isinstance(source, list):
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            rule = "tokenizer_config.json's chat_template, a chat_template.jinja beside it, or --chat-template FILE"
            raise ValueError(f"--tokenizer={folder} has no chat template (rule: {rule})")
        try:
            template = _sandbox().from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat template line {err.lineno}: {err.message} (rule: a Jinja template)") from None
        special = {name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name) is not None}
        return cls(template, special, hashlib.sha256(source.encode()).hexdigest())

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **self.special_tokens,
        )  # fmt: skip


def assistant_spans(template: ChatTemplate, messages: list[dict], loss_on: str, where: str) -> tuple[str, list]:
    """The rendered row and the [start, end) character spans whose tokens are trained (see the module doc).

    Raises:
        ValueError: naming `where` (file:line) when the template is not prefix-stable for this row.
    """
    text = template.render(messages)
    if loss_on == "all":
        return text, [(0, len(text))]
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if loss_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        head = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(head)):
            rule = (
                "rendering messages[:i] with the generation prompt, then messages[:i+1], must extend the text "
                "the whole row renders to; use --loss-on all or a prefix-stable template (--chat-template)"
            )
            raise ValueError(f"{where}: the chat template renders assistant message {i} differently in context "
                             f"(rule: {rule})")  # fmt: skip
        spans.append((len(head), len(upto)))
    return text, spans


def mask_of(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 per token: 1 where the token's first character lies in one of `spans`."""
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for lo, hi in spans:
        mask[(starts >= lo) & (starts < hi)] = 1
    return mask


def _rows(path: Path, field: str) -> Iterator[tuple[str, list[dict]]]:
    """(file:line, messages) of every non-blank line of a JSONL file, read as needed."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{where} is not JSON (rule: --chat inputs hold one JSON object per line)") from None
            messages = record.get(field) if isinstance(record, dict) else None
            ok = isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
            if not ok or not all(isinstance(m.get("role"), str) for m in messages):
                rule = (
                    "every row needs a non-empty list of {role, content} objects; name the field with --messages-field"
                )
                raise ValueError(f"{where}: --messages-field={field} is not a list of messages (rule: {rule})")
            yield where, messages


@dataclass
class _Counts:
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    rows_cut: int = 0
    longest_row: int = 0


def _encode_rows(
    batch: list[tuple[str, list[dict]]], template: ChatTemplate, hf: tokenizers.Tokenizer, eos: tuple[int, str],
    opts: ChatOptions,
) -> list[tuple[np.ndarray, np.ndarray, bool]]:  # fmt: skip
    """(token ids, mask, cut) of each row of `batch`, with the long-row rule applied."""
    rendered = []
    for where, messages in batch:
        try:
            rendered.append(assistant_spans(template, messages, opts.loss_on, where))
        except jinja2.TemplateError as err:
            raise ValueError(f"{where}: the chat template fails: {err} (rule: rows the template accepts)") from None
    out = []
    encodings = hf.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    for (where, _), (_, spans), enc in zip(batch, rendered, encodings, strict=True):
        ids, mask = np.asarray(enc.ids, dtype=np.uint32), mask_of(enc.offsets, spans)
        if eos[0] in enc.ids:
            rule = "rows are separated by a token they never contain, so data.document_mask keeps them apart; "
            raise ValueError(f"{where}: the separator {eos[1]!r} occurs inside the row "
                             f"(rule: {rule}name another with --eos-token)")  # fmt: skip
        cut = opts.seq_len is not None and len(ids) > opts.seq_len
        if cut and opts.long_rows == "refuse":
            rule = "rows fit --seq-len (the train.seq_len they are for), or give --long-rows cut"
            raise ValueError(f"{where}: {len(ids)} tokens > --seq-len={opts.seq_len} (rule: {rule})")
        if cut:
            ids, mask = ids[: opts.seq_len], mask[: opts.seq_len]
        out.append((ids, mask, cut))
    return out


def prepare_chat(
    paths: list[Path],
    out_dir: Path,
    tokenizer: Path,
    opts: ChatOptions = ChatOptions(),  # noqa: B008 - frozen, so a shared default is safe
    eos_token: str | None = None,
    progress: bool = False,
) -> dict:
    """Renders and tokenizes chat rows into OUT/tokens.bin, OUT/loss_mask.bin and OUT/meta.json, atomically.

    Every row is followed by the end-of-text token (mask 0). loss_mask.bin holds one uint8 per token: 1 where
    the token is a target the loss counts (see the module doc).

    Returns:
        The metadata written to meta.json.

    Raises:
        ValueError: one line naming the option or the row (file:line) and the rule.
    """
    opts.check()
    files = [f for p in paths for f in (_visible_files(p) if p.is_dir() else [p]) if f.is_file()]
    if not files:
        raise ValueError(f"prepare --chat: no files under {[str(p) for p in paths]} (rule: give JSONL files or dirs)")
    tok = load_tokenizer(Path(tokenizer), eos_token)
    file = Path(tok.identity["tokenizer_path"])
    hf = tokenizers.Tokenizer.from_file(str(file))
    hf.no_truncation()
    hf.no_padding()
    template = ChatTemplate.load(file.parent, opts.template)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_tokens, tmp_mask = out_dir / "tokens.bin.tmp", out_dir / f"{LOSS_MASK_FILE}.tmp"
    counts = _Counts()
    try:
        with open(tmp_tokens, "wb") as ft, open(tmp_mask, "wb") as fm:
            for path in files:
                rows = _rows(path, opts.messages_field)
                while batch := list(itertools.islice(rows, ROWS_PER_BATCH)):
                    encoded = _encode_rows(batch, template, hf, (tok.eos_id, tok.eos_token), opts)
                    _append(encoded, tok.eos_id, dtype, ft, fm, counts)
                if progress:
                    print(f"prepare --chat: {path}: {counts.rows:,} rows, {counts.tokens:,} tokens", file=sys.stderr)
    except BaseException:
        tmp_tokens.unlink(missing_ok=True)
        tmp_mask.unlink(missing_ok=True)
        raise
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_tokens": counts.tokens,
        "vocab_size": tok.vocab_size,
        **tok.identity,
        "eos_id": tok.eos_id,
        "eos_token": tok.eos_token,
        "files": len(files),
        "documents": counts.rows,
        "chat_template_sha256": template.sha256,
        "messages_field": opts.messages_field,
        "loss_on": opts.loss_on,
        "loss_mask": LOSS_MASK_FILE,
        "loss_tokens": counts.loss_tokens,
        "seq_len": opts.seq_len,
        "long_rows": opts.long_rows,
        "rows_cut": counts.rows_cut,
        "longest_row": counts.longest_row,
    }
    tmp_mask.replace(out_dir / LOSS_MASK_FILE)
    tmp_tokens.replace(out_dir / "tokens.bin")
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    (out_dir / "meta.json.tmp").replace(out_dir / "meta.json")
    return meta


def _append(batch: list, eos_id: int, dtype: type, ft, fm, counts: _Counts) -> None:
    """Writes each row's tokens and mask, then the separator (never a target: the template ends the row)."""
    for ids, mask, cut in batch:
        np.concatenate([ids, [eos_id]]).astype(dtype).tofile(ft)
        np.concatenate([mask, [0]]).astype(np.uint8).tofile(fm)
        counts.rows += 1
        counts.tokens += len(ids) + 1
        counts.loss_tokens += int(mask.sum())
        counts.rows_cut += cut
        counts.longest_row = max(counts.longest_row, len(ids))
