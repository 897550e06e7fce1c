"""Records -> training examples in trl's conversational prompt–completion form.

An *example* here is a dict ``{group, prompt, completion}`` (``split`` too for examples passed
through from another mixture): ``prompt`` is a list of user messages, ``completion`` one
assistant message, so trl puts the loss on the completion only. ``group`` ties together the
examples made from one unit of content (both steps of one question, both directions of one
translation pair, the chunks of one page or report): dedup never removes one member of a group
because of another, and the dev split takes whole groups.

Formats (``versions.<version>.mix.sources.<name>.format``; kinds in ``MIX_FORMATS``):

================== ============ ==============================================================
format             record kind  prompt -> completion
================== ============ ==============================================================
prompt_answer      qa           question -> answer (KRX sample, MetaMath, the generated two-step
                                MCQ pairs, which arrive in MISSION.md's format already); context
                                is not used
worked_solution    qa           question -> "풀이: <context>\\n정답: <answer>" (economic computation:
                                context holds the worked solution)
table_qa           qa           the table (context, JSON rows) as a markdown table + question ->
                                answer
qa_json            qa           the item as JSON (분야/질문/참고) -> {"답변": answer} (v4)
mcq_letter         mcq          step-1 prompt of stages.common.prompts -> the letter (stock
                                direction, agent code questions: answered by letter)
conversation       conversation the turns before the first assistant turn -> the rest: assistant,
                                tool (real output), assistant …; the loss falls on the assistant
                                turns only (stages.common.chat masks the tool turns)
translation        translation  both directions, the languages named in the prompt: two examples
raw_text           document     a page's raw text cut into chunks that fit max_length; the prompt
                                names the document and page and gives the chunk's first line,
                                the completion continues (v2: PDFs used without preprocessing)
document_profile   document     "<title>에 대해 정리하시오." -> text (top-100 companies)
summary_json       document     asks for the summary of report <title> -> the summary JSON (v5_3)
report_json        json         one extract JSON per PDF: its pages packed, in order, into parts
                                that fit max_length; asks for part i/n of report <title> -> that
                                part as JSON {doc_id, title, pages:[{page, text, tables}]} (v3)
example            example      another mixture's examples, unchanged (id, source, split kept)
================== ============ ==============================================================

The Korean instruction text is in ``stages/prompts/mix_formats.yaml`` (and the MCQ format in
``stages/common/prompts.py``).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable

import yaml

from stages.common.chunking import pack
from stages.common.prompts import letter, load_template, step1_prompt

TEMPLATE_FILE = "mix_formats.yaml"
# Tokens kept free below max_length when chunking: BPE merges across the boundary between a
# chunk and the template can differ by a token or two from the separately counted parts.
CHUNK_SAFETY_TOKENS = 8


class FormatError(Exception):
    """A record cannot be formatted; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_templates() -> dict[str, Any]:
    return yaml.safe_load(load_template(TEMPLATE_FILE))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def example(group: str, prompt: str, completion: str) -> dict[str, Any]:
    if not prompt.strip() or not completion.strip():
        raise FormatError("empty_text", "prompt or completion is empty")
    return {"group": group, "prompt": user(prompt), "completion": assistant(completion)}


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def markdown_table(rows: list[list[Any]]) -> str:
    """Rows of cells (first row = header) -> a GitHub markdown table; ``|`` escaped."""
    if not rows or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise FormatError("bad_table", "table is not a non-empty list of rows")
    width = max(len(r) for r in rows)
    if width == 0:
        raise FormatError("bad_table", "table has no cells")

    def line(cells: list[Any]) -> str:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in cells]
        return "| " + " | ".join(cells + [""] * (width - len(cells))) + " |"

    return "\n".join([line(rows[0]), "|" + " --- |" * width] + [line(r) for r in rows[1:]])


# --------------------------------------------------------------------------- token budgets
class Budget:
    """Token arithmetic with the training tokenizer, for the formats that cut long text."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def lengths(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def template_overhead(self, prompt: str) -> int:
        """Tokens of the chat-templated example with this prompt and an empty completion."""
        return count_tokens(self.tokenizer, [user(prompt) + assistant("")])[0]

    def split(self, text: str, budget: int) -> list[str]:
        """``text`` cut into pieces of at most ``budget`` tokens, at token boundaries, preferring
        to end a piece at a line break in its second half. Pieces are stripped, none empty."""
        budget = max(budget, 1)
        offsets = self.tokenizer(text, add_special_tokens=False,
                                 return_offsets_mapping=True)["offset_mapping"]
        pieces, start_token, start_char = [], 0, 0
        while start_token < len(offsets):
            end_token = min(start_token + budget, len(offsets))
            cut = offsets[end_token - 1][1] if end_token < len(offsets) else len(text)
            if end_token < len(offsets):
                newline = text.rfind("\n", start_char + (cut - start_char) // 2, cut)
                if newline > start_char:
                    cut = newline + 1
                    while end_token > start_token + 1 and offsets[end_token - 1][0] >= cut:
                        end_token -= 1
            piece = text[start_char:cut].strip()
            if piece:
                pieces.append(piece)
            start_char = cut
            while end_token < len(offsets) and offsets[end_token][0] < cut:
                end_token += 1
            start_token = max(end_token, start_token + 1)
        return pieces


def count_tokens(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[int]:
    """Tokens of each conversation exactly as trl's SFTTrainer builds its input_ids for a
    prompt–completion example: ``apply_chat_template(prompt + completion)`` (rendered, then
    tokenized without extra special tokens, which is what ``tokenize=True`` does)."""
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the same encodings, without converting every id to Python
        return [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# --------------------------------------------------------------------------- formats
def record_group(r: dict[str, Any]) -> str:
    """The group of a qa record: the generated pairs' ``question_id`` (meta), so both steps of
    one question stay together; otherwise the record itself."""
    try:
        meta = json.loads(r.get("meta") or "{}")
    except ValueError:
        meta = {}
    question_id = meta.get("question_id") if isinstance(meta, dict) else None
    return f"question:{question_id}" if question_id else r["id"]


def format_prompt_answer(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    return [example(record_group(r), r["question"], r["answer"])]


def format_worked_solution(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    if not r["context"].strip():
        return [example(r["id"], r["question"], r["answer"])]
    return [example(r["id"], r["question"],
                    t["worked_solution"].format(solution=r["context"], answer=r["answer"]))]


def format_table_qa(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    try:
        rows = json.loads(r["context"])
    except (TypeError, ValueError):
        raise FormatError("bad_table", "context is not a JSON table") from None
    prompt = t["table_qa"].format(table=markdown_table(rows), question=r["question"])
    return [example(r["id"], prompt, r["answer"])]


def format_qa_json(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    keys = t["qa_json_keys"]
    item = {keys["question"]: r["question"]}
    if r.get("category"):
        item[keys["category"]] = r["category"]
    if r.get("context"):
        item[keys["context"]] = r["context"]
    return [example(r["id"], t["qa_json"].format(item=_json(item)),
                    _json({keys["answer"]: r["answer"]}))]


def format_mcq_letter(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    return [example(r["id"], step1_prompt(r["question"], r["choices"]), letter(r["answer"]))]


def format_conversation(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    messages = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if not first:
        raise FormatError("bad_conversation", "no turn before the first assistant turn")
    return [{"group": r["id"], "prompt": messages[:first], "completion": messages[first:]}]


def format_translation(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    names = t["languages"]
    for lang in (r["source_lang"], r["target_lang"]):
        if lang not in names:
            raise FormatError("unknown_language", f"{lang!r} has no name in {TEMPLATE_FILE}")
    out = []
    for src, tgt, text, answer in ((r["source_lang"], r["target_lang"], r["source_text"], r["target_text"]),
                                   (r["target_lang"], r["source_lang"], r["target_text"], r["source_text"])):
        prompt = t["translation"].format(source_language=names[src], target_language=names[tgt],
                                         text=text)
        out.append(example(r["id"], prompt, answer))
    return out


def _title(r: dict[str, Any]) -> str:
    title = (r.get("title") or "").strip()
    if not title:
        raise FormatError("missing_title", "the format names the document by its title")
    return title


def format_document_profile(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    return [example(r["id"], t["document_profile"].format(title=_title(r)), r["text"])]


def format_summary_json(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    try:
        summary = json.loads(r["text"])
    except ValueError:
        raise FormatError("bad_summary", "text is not JSON") from None
    return [example(r["doc_id"], t["summary_json"].format(title=_title(r)), _json(summary))]


def format_raw_text(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    """One page -> chunks that fit; group = the page (chunks of a page stay together)."""
    title, page = _title(r) if r.get("title") else r["doc_id"], r["page"]
    overhead = max(b.template_overhead(t["raw_text"].format(title=title, page=page, head="")),
                   b.template_overhead(t["raw_text_no_head"].format(title=title, page=page)))
    budget = b.max_length - overhead - CHUNK_SAFETY_TOKENS
    out = []
    for chunk in b.split(r["text"], budget):
        head, _, rest = chunk.partition("\n")
        if rest.strip():
            prompt, completion = t["raw_text"].format(title=title, page=page, head=head), rest
        else:
            prompt, completion = t["raw_text_no_head"].format(title=title, page=page), chunk
        out.append(example(r["id"], prompt, completion.strip()))
    if not out:
        raise FormatError("empty_text", "page has no text")
    return out


def format_report_json(doc: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    """One extract JSON (a whole report) -> parts of consecutive pages that fit max_length.
    A page too long for one part is cut into text pieces (its tables go in their own entry)."""
    title = (doc.get("title") or doc.get("doc_id") or "").strip()
    doc_id = doc.get("doc_id")
    pages = doc.get("pages")
    if not doc_id or not isinstance(pages, list) or not pages:
        raise FormatError("bad_report_json", "needs doc_id and a non-empty pages list")
    skeleton = _json({"doc_id": doc_id, "title": title, "pages": []})
    overhead = b.template_overhead(t["report_json"].format(title=title, part=999, parts=999))
    budget = b.max_length - overhead - b.lengths([skeleton])[0] - CHUNK_SAFETY_TOKENS
    entries: list[dict[str, Any]] = []
    for page in pages:
        entry = {"page": page.get("page"), "text": page.get("text", ""), "tables": page.get("tables", [])}
        if b.lengths([_json(entry)])[0] + 1 <= budget:
            entries.append(entry)
            continue
        text_budget = budget - b.lengths([_json({"page": entry["page"], "text": ""})])[0] - 1
        entries += [{"page": entry["page"], "text": piece} for piece in b.split(entry["text"], text_budget)]
        if entry["tables"]:
            entries.append({"page": entry["page"], "tables": entry["tables"]})
    sizes = b.lengths([_json(e) for e in entries])
    # each entry costs its tokens + 1 (the comma between entries)
    parts = pack(list(range(len(entries))), lambda i: sizes[i] + 1, budget)
    parts = [[entries[i] for i in part] for part in parts] or [[]]
    out = []
    for index, part in enumerate(parts, 1):
        prompt = t["report_json"].format(title=title, part=index, parts=len(parts))
        out.append(example(doc_id, prompt, _json({"doc_id": doc_id, "title": title, "pages": part})))
    return out


def format_example(r: dict[str, Any], t: dict[str, Any], b: Budget) -> list[dict]:
    """Another mixture's example, unchanged (id, source and split kept). All examples of one
    mixture form one group: that mixture was deduplicated already, and its upsampled copies
    must stay."""
    return [{"group": "mixture", "id": r["id"], "prompt": r["prompt"],
             "completion": r["completion"], "split": r["split"], "source": r["source"]}]


FORMATTERS: dict[str, Callable[[dict[str, Any], dict[str, Any], Budget], list[dict]]] = {
    "prompt_answer": format_prompt_answer, "worked_solution": format_worked_solution,
    "table_qa": format_table_qa, "qa_json": format_qa_json, "mcq_letter": format_mcq_letter,
    "conversation": format_conversation,
    "translation": format_translation, "raw_text": format_raw_text,
    "document_profile": format_document_profile, "summary_json": format_summary_json,
    "report_json": format_report_json, "example": format_example,
}


def passes_filters(record: dict[str, Any], include: dict[str, list[str]],
                   exclude: dict[str, list[str]]) -> bool:
    """``include``: every named field's value is one of the listed; ``exclude``: none is."""
    for field, values in include.items():
        if str(record.get(field)) not in values:
            return False
    for field, values in exclude.items():
        if str(record.get(field)) in values:
            return False
    return True


def check_filter_fields(fields: Iterable[str], include: dict, exclude: dict) -> list[str]:
    """Filter fields that the records do not have (a typo in params)."""
    known = set(fields)
    return sorted((set(include) | set(exclude)) - known)
